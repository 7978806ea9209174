"""Which tokens of a chat record are learned: every assistant turn, or only the last.

A chat record's tokens are its `messages` rendered by the model's chat template
(tokenized, as `tokenizer.apply_chat_template` gives them). Which of them the loss
counts is found by rendering the template incrementally, for each assistant turn i:

    P_i = the messages before turn i, with the generation prompt   (what the model sees
          when it starts to answer: everything up to the answer's first token)
    F_i = the messages up to and including turn i                   (the answer written)

When every P_i and F_i is a prefix of the whole rendering T, answer i is
T[len(P_i):len(F_i)]: the answer's tokens and the end-of-turn tokens the template
writes after it (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), so that the model learns to
stop. System, user and tool turns, role headers and generation prompts are context
(as Hugging Face TRL's assistant-only loss). `learn_assistant_turns="last"` learns the
final answer only, exactly as mlx-lm's mask_prompt does (T from len(P_last) on).

Not every template renders a conversation's beginning the same way once more turns
follow (one that moves the system prompt to the last user turn, one that writes an
empty reasoning block only into the last assistant turn). For such a record the
answers are found in the text of T instead: each assistant message's content, in
order, verbatim; its tokens are those whose characters (the tokenizer's offsets)
overlap the content, plus the special token that ends the turn right after it. If a
template does not write an answer verbatim, nothing can tell its tokens apart: that
record learns its last answer only, by the mlx-lm rule, and a note says so once.
"""

from __future__ import annotations

import sys

Span = tuple[int, int]  # [start, end) token positions whose tokens are learned

_noted_unfound = False


def chat_tokens(tokenizer, messages: list, turns: str, tools: list | None = None) -> tuple[list[int], list[Span]]:
    """(token ids of the rendered chat, the spans learned) for `turns` "all" or "last".
    `tools`: the record's tool definitions, which the template renders (mlx-lm's ChatDataset
    passes them the same way); an assistant turn that calls tools is an answer like any other."""
    tokens = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    if turns == "last":
        return tokens, [last_answer_span(tokenizer, messages, tokens, tools)]
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    spans = _spans_by_prefixes(tokenizer, messages, answers, tokens, tools)
    if spans is None:
        spans = _spans_by_text(tokenizer, messages, answers, tokens, tools)
    if spans is None:
        _note_unfound()
        spans = [last_answer_span(tokenizer, messages, tokens, tools)]
    return tokens, spans


def last_answer_span(tokenizer, messages: list, tokens: list[int], tools: list | None = None) -> Span:
    """mlx-lm's mask_prompt: everything after the rendering of the messages before the last
    one, with the generation prompt."""
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True, tools=tools)
    return len(prompt), len(tokens)


def render(tokenizer, messages: list, add_generation_prompt: bool, tools: list | None = None) -> list[int]:
    """The chat template's token ids for `messages` (and `tools`, as mlx-lm's ChatDataset passes them)."""
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(ids, dict):  # newer transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _spans_by_prefixes(tokenizer, messages: list, answers: list[int], tokens: list[int],
                       tools: list | None) -> list[Span] | None:
    """The spans from prefix lengths, or None when some prefix does not render as a prefix
    of the whole (or does not render at all: a template may refuse a cut conversation)."""
    spans = []
    for i in answers:
        try:
            before = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
            through = tokens if i == len(messages) - 1 else render(tokenizer, messages[:i + 1], False, tools)
        except Exception:  # jinja2's TemplateError and whatever a template raises
            return None
        if not (_is_prefix(before, tokens) and _is_prefix(through, tokens)) or len(through) < len(before):
            return None
        spans.append((len(before), len(through)))
    return spans


def _is_prefix(part: list[int], whole: list[int]) -> bool:
    return len(part) <= len(whole) and whole[:len(part)] == part


def _spans_by_text(tokenizer, messages: list, answers: list[int], tokens: list[int],
                   tools: list | None) -> list[Span] | None:
    """The spans from where each answer's text lies in the rendered conversation, or None
    when the tokenizer gives no offsets or an answer is not written verbatim (a turn that
    only calls tools has no text to look for)."""
    fast = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF tokenizer
    try:
        text = fast.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False)
        encoded = fast(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        return None
    if list(encoded["input_ids"]) != tokens:
        return None
    offsets = encoded["offset_mapping"]
    special = set(getattr(fast, "all_special_ids", [])) | set(getattr(fast, "added_tokens_decoder", {}))
    spans, cursor, token = [], 0, 0
    for i in answers:
        content = messages[i].get("content")
        start = text.find(content, cursor) if content else -1
        if start < 0:
            return None
        end = start + len(content)
        while token < len(tokens) and offsets[token][1] <= start:
            token += 1
        first = token
        while token < len(tokens) and offsets[token][0] < end:
            token += 1
        if token < len(tokens) and tokens[token] in special:
            token += 1  # the end of the turn: learned, so the model learns to stop
        spans.append((first, token))
        cursor = end
    return spans


def _note_unfound() -> None:
    global _noted_unfound
    if not _noted_unfound:
        _noted_unfound = True
        print("note: this model's chat template does not write some assistant answers as they are in the "
              "data, so their tokens cannot be told apart: those records learn their last answer only",
              file=sys.stderr)
