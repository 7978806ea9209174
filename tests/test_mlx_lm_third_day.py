"""An mlx-lm user's third day: tool-calling chats as mlx-lm takes them, `mlx_lm lora`'s own flags
and keys, every mistake of a run named at once, a warmup that fits the run, answers from an
instruct model through its chat template, and metric names that say what they measure.

The runs go in the test's process (run_in_process) on the tiny model, a few steps each."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS, write_jsonl


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def fresh_tiny_tokenizer():
    """The tiny model's tokenizer, a copy of its own (a test changes its chat template)."""
    from mlx_lm.utils import load_tokenizer

    import modeling

    return load_tokenizer(Path(modeling.ensure_tiny_model()))


def learned_positions(index, row: int) -> set[int]:
    """The token positions the training loss counts for one sample: target j is token j + 1."""
    from corpus.batching import collate

    batch = collate(index, np.array([row]), 1, pad_id=0)
    return {j + 1 for j in np.flatnonzero(batch.mask[0])}


# ------------------------------------------------------------------ tool-calling chats

# The tiny model's template, with tools and tool calls written out as a tool-calling template does.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>TOOLS: {% for tool in tools %}{{ tool['function']['name'] }} {% endfor %}<eos>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}CALL "
    "{{ call['function']['name'] }} {{ call['function']['arguments'] | tojson }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a record up.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def tool_chat(rng: random.Random, content_key: bool) -> dict:
    """A chat whose assistant calls a tool (`content` null, or absent), then answers from its result."""
    call = {"role": "assistant", "tool_calls": [{"type": "function", "id": "c1", "function": {
        "name": "lookup", "arguments": {"q": words(rng, 2)}}}]}
    if content_key:
        call["content"] = None
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are an archivist."},
        {"role": "user", "content": words(rng, 4)},
        call,
        {"role": "tool", "tool_call_id": "c1", "content": words(rng, 3)},
        {"role": "assistant", "content": words(rng, 5)},
    ]}


def test_tool_calling_chats_render_as_mlx_lm_renders_them_and_their_tool_calls_are_learned(tmp_path):
    from mlx_lm.tuner.datasets import ChatDataset

    from corpus.index import CorpusIndex

    tokenizer = fresh_tiny_tokenizer()
    tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    rng = random.Random(3)
    records = [tool_chat(rng, content_key=True), tool_chat(rng, content_key=False)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    every = CorpusIndex.build(path, tokenizer, 512)
    last = CorpusIndex.build(path, tokenizer, 512, turns="last")
    header, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    for row, record in enumerate(records):
        tokens = every.samples([row])[0].tokens
        # Token for token what mlx_lm lora trains on, the tools rendered; with mask_prompt, the same offset.
        theirs, _ = ChatDataset([record], tokenizer).process(record)
        masked, offset = ChatDataset([record], tokenizer, mask_prompt=True).process(record)
        assert tokens == theirs == masked
        assert tokenizer.decode(tokens).startswith("<|system|>TOOLS: lookup <eos><|system|>You are an archivist.")
        assert learned_positions(last, row) == set(range(offset, len(tokens)))
        # Every assistant turn, the one that calls the tool too: from after its header through its <eos>.
        answers = [set(range(i + 1, tokens.index(eos, i) + 1)) for i, t in enumerate(tokens) if t == header]
        assert len(answers) == 2 and "CALL lookup" in tokenizer.decode([tokens[i] for i in sorted(answers[0])])
        assert learned_positions(every, row) == answers[0] | answers[1]


@pytest.mark.parametrize("message, fragment", [
    ({"role": "assistant", "content": None}, "messages[1] must be an object with a string 'content' (null or absent "
                                             "only in an assistant message with 'tool_calls')"),
    ({"role": "user", "content": None, "tool_calls": [{"function": {"name": "f"}}]}, "messages[1]: 'tool_calls' must"),
    ({"role": "assistant", "tool_calls": []}, "messages[1]: 'tool_calls' must be a non-empty list"),
])
def test_a_bad_tool_call_is_one_line(message, fragment, tmp_path):
    from corpus.records import parse_record

    from errors import UserError

    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, message,
                                    {"role": "assistant", "content": "done"}]})
    with pytest.raises(UserError, match="train.jsonl:3: ") as caught:
        parse_record(line, "train.jsonl", 3)
    assert fragment in str(caught.value)
    with pytest.raises(UserError, match="'tools' must be a list"):
        parse_record(json.dumps({"tools": "lookup", "messages": [{"role": "assistant", "content": "x"}]}), "t", 1)
