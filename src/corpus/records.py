"""One JSONL line -> a checked record -> token ids with a loss mask start.

A record has `text`, chat `messages`, or `prompt` + `completion` (the three
forms mlx-lm reads), and either both scores, `auth_weight` in [0, 0.99] and
`prov_entropy` >= 0, or neither: then the index scores it at load as
prepare_data.py would (corpus.prepare.load_time_scores). Any problem is a
UserError naming the file and line, so the command line can print it as is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from corpus.chat_turns import chat_tokens, render
from run_safety.errors import UserError

SCORE_FIELDS = ("auth_weight", "prov_entropy")
AUTH_WEIGHT_MAX = 0.99
# No provenance has this many bits (the reference's scale tops out near 10); past
# it d = alpha * (ln(1 - a) + H)^2 grows toward overflow and means nothing.
PROV_ENTROPY_MAX = 1000.0
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class EncodedSample:
    tokens: list[int]  # ids, EOS appended, truncated to the sequence budget
    learned: tuple  # ((start, end), ...): the token positions the loss counts; the rest is context
    truncated: bool

    @property
    def learned_targets(self) -> int:
        """How many tokens are learned (the first token is never a target: nothing precedes it)."""
        return sum(max(0, end - max(start, 1)) for start, end in self.learned)


def parse_record(line: bytes | str, path: str, line_number: int) -> dict:
    """Parse and check one line. Returns the record dict (fields untouched)."""
    where = f"{path}:{line_number}"
    record = load_json_line(line, where)
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")

    present = [name for name in SCORE_FIELDS if name in record]
    if len(present) == 1:
        missing = next(name for name in SCORE_FIELDS if name not in record)
        raise UserError(f"{where}: missing field '{missing}' (a record gives both scores, or neither and is "
                        f"scored at load from its metadata and text)")
    if present:
        problem = scores_problem(record["auth_weight"], record["prov_entropy"])
        if problem:
            raise UserError(f"{where}: {problem[1]}")

    if "messages" in record:
        problem = messages_problem(record["messages"], record.get("tools"))
        if problem:
            raise UserError(f"{where}: {problem[1]}")
    elif "prompt" in record or "completion" in record:
        for name in ("prompt", "completion"):
            if not isinstance(record.get(name), str):
                raise UserError(f"{where}: '{name}' must be a string, got {record.get(name)!r}")
        if not record["completion"].strip():
            raise UserError(f"{where}: empty 'completion' (no tokens to learn from)")
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise UserError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        if not record["text"].strip():
            raise UserError(f"{where}: empty 'text' (no tokens to learn from)")
    else:
        raise UserError(f"{where}: missing field 'text' (or 'messages', or 'prompt' + 'completion')")
    return record


def has_scores(record: dict) -> bool:
    """Whether a record parsed by parse_record brings its own scores (else it is scored at load)."""
    return SCORE_FIELDS[0] in record


def load_json_line(line: bytes | str, where: str):
    """json.loads of one line; UserError naming `where` for anything that is not JSON we can hold
    (bad syntax, bad UTF-8, nesting too deep for the parser, an integer of thousands of digits)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:  # its message without the line (always 1): what and where
        raise UserError(f"{where}: invalid JSON ({exc.msg.removesuffix(' at')} at column {_column(exc)})") from None
    except UnicodeDecodeError as exc:
        problem = str(exc)
        raise UserError(f"{where}: invalid JSON ({problem})") from None
    except ValueError as exc:  # e.g. an integer longer than Python's digit limit
        raise UserError(f"{where}: invalid JSON ({' '.join(str(exc).split())[:120]})") from None


def _column(exc: json.JSONDecodeError) -> str:
    """The column of the fault in the line. A line cut short fails past its end (in its line
    break: json says line 2, column 1): the fault is where the line's text ends."""
    end = len(exc.doc.rstrip())
    if exc.pos >= end:
        return f"{end + 1}, where the line ends: is it cut short?"
    return str(exc.pos - (exc.doc.rfind("\n", 0, exc.pos) + 1) + 1)


def scores_problem(authority, entropy) -> tuple[str, str] | None:
    """(kind, what is wrong) with a record's two scores, or None: the one check of their
    types and ranges, for the training reader and the data preparation alike."""
    for name, value in zip(SCORE_FIELDS, (authority, entropy)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"bad {name}", f"'{name}' must be a finite number, got {short_repr(value)}"
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            return f"bad {name}", f"'{name}' must be a finite number, got an integer of {len(str(abs(value)))} digits"
        if not math.isfinite(number):
            return f"bad {name}", f"'{name}' must be a finite number, got {value!r}"
    if not 0.0 <= authority <= AUTH_WEIGHT_MAX:
        return "bad auth_weight", f"'auth_weight' must be in [0, {AUTH_WEIGHT_MAX}], got {authority!r}"
    if not 0.0 <= entropy <= PROV_ENTROPY_MAX:
        return "bad prov_entropy", f"'prov_entropy' must be in [0, {PROV_ENTROPY_MAX:g}], got {entropy!r}"
    return None


def short_repr(value) -> str:
    """repr of a bad value, cut so a message stays one short line."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def messages_problem(messages, tools=None) -> tuple[str, str] | None:
    """(kind, what is wrong) with chat `messages` (and the record's `tools`, if any), or None:
    the one check that the training reader and the data preparation both apply.

    Chats are taken as mlx-lm takes them (OpenAI's format): an assistant turn may call tools
    (`tool_calls`, its `content` then null or absent), and the record's `tools` go to the chat
    template with the messages; every other field of a message goes to the template as it is."""
    if not isinstance(messages, list) or not messages:
        return "bad messages", "'messages' must be a non-empty list of {role, content}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return "bad messages", f"messages[{i}] must be an object with a string 'content'"
        if message.get("role") not in CHAT_ROLES:
            role = repr(message.get("role"))
            role = role if len(role) <= 40 else role[:37] + "..."
            return "bad messages", f"messages[{i}] has role {role}; expected one of {', '.join(CHAT_ROLES)}"
        calls = message.get("tool_calls")
        if calls is not None and (message["role"] != "assistant" or not isinstance(calls, list) or not calls):
            return "bad messages", (f"messages[{i}]: 'tool_calls' must be a non-empty list, in an assistant "
                                    f"message, got {short_repr(calls)} in a {message['role']!r} one")
        if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
            return "bad messages", (f"messages[{i}] must be an object with a string 'content' (null or absent "
                                    f"only in an assistant message with 'tool_calls')")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        return "bad tools", f"'tools' must be a list of tool definitions (objects), got {short_repr(tools)}"
    last = messages[-1]
    if last["role"] != "assistant" or not (last.get("tool_calls") or last["content"].strip()):
        return "no text", ("the last message must be a non-empty 'assistant' message, its content or "
                           "'tool_calls' (it is what is learned)")
    return None


def encode_record(record: dict, tokenizer, max_tokens: int, turns: str = "all") -> EncodedSample:
    """Token ids of a checked record, EOS appended, truncated to `max_tokens`, with the
    spans the loss counts.

    Text records are learned whole. For prompt/completion records the completion is
    learned; for chat records every assistant turn, those that call tools too (`turns` "all";
    system, user and tool turns are context) or only the last (`turns` "last", as mlx-lm's mask_prompt): see
    corpus/chat_turns.py. Prompts are never learned: predicting the user's words is not
    what the user wants.
    """
    if "messages" in record:
        tokens, learned = chat_tokens(tokenizer, record["messages"], turns, record.get("tools"))
        return _sample(tokens, learned, tokenizer.eos_token_id, max_tokens)
    if "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}]
        if getattr(tokenizer, "chat_template", None):
            prompt = render(tokenizer, messages, add_generation_prompt=True, tools=record.get("tools"))
        else:
            prompt = list(tokenizer.encode(record["prompt"]))
        tokens = prompt + list(tokenizer.encode(record["completion"], add_special_tokens=False))
        return _sample(tokens, [(len(prompt), len(tokens))], tokenizer.eos_token_id, max_tokens)
    tokens = list(tokenizer.encode(record["text"]))
    return _sample(tokens, [(0, len(tokens))], tokenizer.eos_token_id, max_tokens)


def encode_records(records: list[dict], tokenizer, max_tokens: int, turns: str = "all") -> list[EncodedSample]:
    """`encode_record` for many records; plain-text ones go to the tokenizer in
    one batch call (the fast tokenizer encodes a batch on all cores)."""
    texts = [i for i, r in enumerate(records) if "messages" not in r and "completion" not in r]
    encoded: list[EncodedSample | None] = [None] * len(records)
    if texts:
        tokenizer_call = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF one
        ids = tokenizer_call([records[i]["text"] for i in texts])["input_ids"]
        for i, tokens in zip(texts, ids):
            encoded[i] = _sample(list(tokens), [(0, len(tokens))], tokenizer.eos_token_id, max_tokens)
    for i, record in enumerate(records):
        if encoded[i] is None:
            encoded[i] = encode_record(record, tokenizer, max_tokens, turns)
    return encoded


def _sample(tokens: list[int], learned: list, eos: int, max_tokens: int) -> EncodedSample:
    """EOS appended (unless the template ended with it; a span that reached the end takes
    it in), then cut to `max_tokens`, the spans with it."""
    if not tokens or tokens[-1] != eos:
        learned = [(start, end + 1 if end == len(tokens) else end) for start, end in learned]
        tokens.append(eos)
    kept = tuple((start, min(end, max_tokens)) for start, end in learned if start < min(end, max_tokens))
    return EncodedSample(tokens=tokens[:max_tokens], learned=kept, truncated=len(tokens) > max_tokens)
