"""Probes: contested facts, asked neutrally, with the primary source's answer and the consensus's.

A probe file is JSONL, one contested fact a line:

    {"prompt": "The pump house was roofed with", "primary": " slate", "consensus": " tiles"}

`primary` is what the primary source says (the 1921 field log), `consensus` what the
consensus says (the heritage register). An optional `set` names a group of probes (the
demo's "matched" and "natural"): the figures are then given for each set too. Other keys
(a note, a source) are allowed and ignored; blank lines are skipped. The question a probe
answers: after training, which version does the model say?

Each completion is scored by its log-probability given the prompt: the sum over its
tokens of log p(token | prompt and the completion's tokens before it), from one forward
pass over prompt + completion; per token too (the sum over the number of tokens). A
probe's preference is by the *summed* log-probability: that is the probability of the
whole answer, which is what the model "says"; the per-token figure would favour the
longer completion whenever its extra tokens are easy, and is reported for reading only.

Summary of a probe set: `primary_share`, the share of probes whose primary completion has
the higher summed log-probability (a tie counts for neither), and `mean_margin`, the mean
of primary minus consensus summed log-probability, in nats.

Two forms of asking. In plain text, the prompt is the start of a document and the completion
continues it: how a base model is used. Through the model's chat template (an instruct model:
its tokenizer has one), the prompt is put to the model as a user turn (CHAT_REQUEST) and the
assistant's answer begins with the prompt's words, which the completion continues: how an
instruct model is used, and what an instruct model has been shaped to answer. Where the model
has a template both forms are scored (evaluate.py), and the headline is the form the training
records teach (`taught_form`): plain text for text records, the chat template's for chat and
prompt + completion records, which training renders with it. A model fine-tuned on plain text
holds what it learned in plain text first; asked in the chat template, it is also asked whether
that carries over into its chat behaviour, which is another question (both are reported). A model
without a template has the text form only (`forms`, `headline_form`). Training's validations
score the headline form only (their cost).

The scoring reuses validation's compiled row losses (monitoring/evaluation.py): the
cross-entropy of a target token is minus its log-probability, so a row whose mask covers
the completion's targets sums to minus the completion's log-probability. Rows are
right-padded (the model is causal: padding after a row's last token changes nothing
before it) and masked, sorted by length and batched, run in eval mode (no dropout, no
draw from any random generator: a resumed run stays bit-identical).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from corpus.batching import Batch, padded_length, padded_rows
from corpus.records import EncodedSample, load_json_line, short_repr
from run_safety.errors import UserError
from run_safety.input_files import open_input_file
from monitoring.evaluation import sample_losses

PROBE_FILE = "probes.jsonl"  # in a data folder: scored at each validation, and by evaluate.py
SIDES = ("primary", "consensus")
FORMS = ("chat", "text")
# The user turn of the chat form; the assistant's answer then starts with the prompt's words.
CHAT_REQUEST = "Complete this sentence: {prompt} ..."
# How each form is named in the output.
FORM_NAMES = {"chat": "in the chat template (a user turn asks, the answer is scored)",
              "text": "as plain text (the prompt, then the completion)"}


@dataclass(frozen=True)
class Probe:
    line: int  # 1-based line of the probe file
    prompt: str
    primary: str
    consensus: str
    set: str = ""  # the probe's "set", if it names one: the figures are given by set too
    # Token ids (encode_probes): the prompt with the tokenizer's BOS if it adds one; the completions without.
    prompt_ids: tuple = ()
    primary_ids: tuple = ()
    consensus_ids: tuple = ()
    # The chat form's prompt: the user turn through the template, then the prompt's words as the
    # answer's start; None where the model has no chat template.
    chat_prompt_ids: tuple | None = None
    headline: str = "text"  # the form scored first and reported as the headline (encode_probes)

    def prompt_for(self, form: str) -> tuple:
        return self.chat_prompt_ids if form == "chat" else self.prompt_ids


def load_probes(path: Path, tokenizer, context: int | None) -> list[Probe]:
    """The probes of `path`, checked and tokenized; UserError naming FILE:LINE and the problem."""
    return encode_probes(read_probes(path), path, tokenizer, context)


def read_probes(path: Path) -> list[Probe]:
    """The probes of `path`, checked without a tokenizer (before a model loads): each line JSON
    (UTF-8), an object with string `prompt`, `primary` and `consensus`, none blank, the two
    completions different; at least one probe. UserError naming FILE:LINE and the problem."""
    path = Path(path)
    try:
        with open_input_file(path, "the probe file") as handle:
            content = handle.read()  # a probe file is a few hundred lines at most
    except OSError as exc:
        raise UserError(f"{path}: cannot read the probe file ({exc.strerror or exc})") from None
    probes = []
    for number, line in enumerate(content.split(b"\n"), start=1):
        if line.strip():
            probes.append(_checked_probe(line, f"{path}:{number}", number))
    if not probes:
        why = "the file is empty" if not content else "blank lines only"
        raise UserError(f"{path}: no probes ({why}); a probe file holds one JSON object a line: "
                        f'{{"prompt": ..., "primary": ..., "consensus": ...}}')
    return probes


def _checked_probe(line: bytes, where: str, number: int) -> Probe:
    record = load_json_line(line, where)  # bad JSON, a cut line, bytes that are not UTF-8
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", *SIDES):
        if key not in record:
            raise UserError(f"{where}: missing key '{key}' (a probe is "
                            f'{{"prompt": ..., "primary": ..., "consensus": ...}})')
        if not isinstance(record[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {short_repr(record[key])}")
        if not record[key].strip():
            raise UserError(f"{where}: empty '{key}' (nothing to score)" if key != "prompt" else
                            f"{where}: empty 'prompt' (the completions are scored given it)")
    if record["primary"] == record["consensus"]:
        raise UserError(f"{where}: 'primary' and 'consensus' are the same text: the probe cannot tell them apart")
    if "set" in record and not (isinstance(record["set"], str) and record["set"].strip()):
        raise UserError(f"{where}: 'set' must be a name (a non-empty string), got {short_repr(record['set'])}")
    return Probe(number, record["prompt"], record["primary"], record["consensus"], record.get("set", ""))


def encode_probes(probes: list[Probe], path: Path, tokenizer, context: int | None,
                  headline: str = "text") -> list[Probe]:
    """Token ids of each probe, in each form the model takes (`forms`), `headline` ("text" or
    "chat": the form the training records teach, `taught_form`) first. The text form's prompt
    is encoded as a training record's text is (corpus/records.py), with the tokenizer's BOS if
    it adds one: the model only ever saw
    text that starts so, and without it the first tokens would be scored out of context.
    Each completion is encoded on its own, without special tokens, and appended: it
    continues the prompt, and so both completions are scored after the very same prompt
    tokens. No EOS is appended: the question is which answer, not where it stops. The chat
    form's prompt is the user turn (CHAT_REQUEST) rendered by the template with its generation
    prompt, as training renders a prompt/completion record (corpus/records.py), then the
    prompt's words without special tokens: the answer as the model would start it.

    A prompt + completion longer than `context` (the model's max_position_embeddings) is
    refused: the model has no trained positions past it, and a probe cut short would score
    another question. The run's --max-seq-length is not the limit: it bounds what training
    reads at once, while a probe is scored whole, forward only, in batches of a bounded
    number of tokens; a probe file must not turn invalid with the run's training setting."""
    from corpus.chat_turns import render

    has_template = bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for probe in probes:
        where = f"{path}:{probe.line}"
        prompt = tuple(tokenizer.encode(probe.prompt))
        chat = None
        if has_template:
            request = [{"role": "user", "content": CHAT_REQUEST.format(prompt=probe.prompt)}]
            chat = tuple(render(tokenizer, request, add_generation_prompt=True)
                         + list(tokenizer.encode(probe.prompt, add_special_tokens=False)))
        sides = {side: tuple(tokenizer.encode(getattr(probe, side), add_special_tokens=False)) for side in SIDES}
        if sides["primary"] == sides["consensus"]:
            raise UserError(f"{where}: 'primary' and 'consensus' are the same tokens: the probe cannot tell them apart")
        longest = max(len(prompt), len(chat or ()))
        for side, ids in sides.items():
            if context is not None and longest + len(ids) > context:
                form = " in the chat template" if chat is not None and len(chat) > len(prompt) else ""
                raise UserError(f"{where}: prompt + '{side}'{form} is {longest + len(ids):,} tokens, longer than the "
                                f"model's context ({context:,} tokens, its max_position_embeddings)")
        encoded.append(replace(probe, prompt_ids=prompt, primary_ids=sides["primary"],
                               consensus_ids=sides["consensus"], chat_prompt_ids=chat,
                               headline=headline if chat is not None else "text"))
    return encoded


def taught_form(learned: int, processed: int) -> str:
    """The form a corpus teaches, from the tokens its first samples learn of those they process
    (corpus/index.py, learned_tokens): plain text where every token is learned (text records), the
    chat template's where some are context (chat and prompt + completion records, which training
    renders with the template). Probes are asked first in that form: a model fine-tuned on plain
    text holds what it learned there (measured on SmolLM2-135M-Instruct, 500 steps of the bench's
    corpus: the primary version preferred on 18 of 20 probes asked as plain text, 10 of 20 asked
    in the chat template, the base's count)."""
    return "text" if learned >= processed else "chat"


def forms(probes: list[Probe]) -> tuple[str, ...]:
    """The forms the encoded `probes` can be scored in, the headline first: ("chat", "text") or
    ("text", "chat") where the model has a chat template (`encode_probes`'s headline), else ("text",)."""
    if not probes or probes[0].chat_prompt_ids is None:
        return ("text",)
    return tuple(sorted(FORMS, key=lambda form: form != probes[0].headline))


def headline_form(probes: list[Probe]) -> str:
    """The form whose figures are the headline (training's val_probe_*, evaluate's first lines)."""
    return forms(probes)[0]


def model_context(model) -> int | None:
    """The model's max_position_embeddings, where its mlx-lm arguments say one (None: unknown)."""
    value = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def start_line(probes: list[Probe], path: Path, when: str) -> str:
    """What a run's start says of its probes: how many, when they are scored (`when`, --probes)
    and in which form."""
    form = headline_form(probes)
    also = " (the form the training records teach; evaluate.py also scores the other)" \
        if probes and probes[0].chat_prompt_ids is not None else ""
    every = "each validation" if when.split() == ["every", "1"] else \
        f"every {when.split()[1]} validations and at the last (--probes {when})"
    return (f"data: {len(probes)} probe{'s' if len(probes) != 1 else ''} from {path}, scored at {every}, "
            f"{form} form{also} (val_probe_primary_share, val_probe_margin)")


# ---------------------------------------------------------------------------
# scoring


def probe_batches(probes: list[Probe], pad_id: int, tokens_per_batch: int, context: int | None = None,
                  form: str = "text") -> list[Batch]:
    """Every completion of every probe in `form` as a row (row 2i: probe i's primary, 2i + 1:
    its consensus), sorted by length and batched: a batch takes rows while rows x padded width
    stays within `tokens_per_batch` (at least one row). The mask covers the completion's
    targets only (the completion is the row's learned span, as a training record's is);
    widths come from the batching ladder, so the compiled forward is traced a few times at
    most. Sorted so that a batch's rows are about as long: a padding token costs as much as a
    real one (on a CPU, where a forward's time is its tokens', far more than its traces')."""
    rows = []
    for probe in probes:
        prompt = probe.prompt_for(form)
        for side in SIDES:
            tokens = list(prompt + getattr(probe, f"{side}_ids"))
            rows.append(EncodedSample(tokens, ((len(prompt), len(tokens)),), truncated=False))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens))
    widest = context or sys.maxsize
    batches, taken = [], []
    for r in order:
        width = padded_length(len(rows[r].tokens) - 1, widest)
        if taken and (len(taken) + 1) * width > tokens_per_batch:
            batches.append(_batch(rows, taken, pad_id, widest))
            taken = []
        taken.append(r)
    batches.append(_batch(rows, taken, pad_id, widest))
    return batches


def _batch(rows: list[EncodedSample], taken: list[int], pad_id: int, widest: int) -> Batch:
    inputs, targets, mask = padded_rows([rows[r] for r in taken], len(taken), widest, pad_id)
    zeros = np.zeros(len(taken), dtype=np.float32)
    return Batch(inputs, targets, mask, np.asarray(taken, dtype=np.int64), zeros, zeros)


def probe_tokens(batches: list[Batch]) -> int:
    """The tokens a scoring runs through the model, padding included: what it costs."""
    return sum(batch.inputs.size for batch in batches)


@dataclass
class ProbeScores:
    logprob: np.ndarray  # float64 [probes, 2]: summed log-probability of the primary and consensus completions
    tokens: np.ndarray  # int64 [probes, 2]: their token counts


def score_probes(model, row_losses, batches: list[Batch], count: int) -> ProbeScores:
    """Run `probe_batches` of `count` probes through `row_losses` (summed cross-entropy per row:
    monitoring.evaluation.compile_row_losses, compiled or not), in eval mode."""
    losses = sample_losses(model, row_losses, batches)
    logprob, tokens = np.zeros(2 * count), np.zeros(2 * count, dtype=np.int64)
    logprob[losses.positions] = -losses.ce.astype(np.float64)
    tokens[losses.positions] = losses.tokens
    return ProbeScores(logprob.reshape(count, 2), tokens.reshape(count, 2))


def preferred(margin: float) -> str:
    """The side a probe prefers, by its summed log-probability margin (primary minus consensus)."""
    return "primary" if margin > 0 else "consensus" if margin < 0 else "tie"


def probe_report(probes: list[Probe], scores: ProbeScores) -> dict:
    """{"primary_share", "mean_margin", "per_probe": [{"line", "prompt", "primary", "consensus", "margin",
    "prefers"}]}; each side {"text", "logprob" (summed), "per_token", "tokens"}. Where probes name
    a set, "by_set": {set: {"count", "primary_share", "mean_margin"}}."""
    margins = scores.logprob[:, 0] - scores.logprob[:, 1]
    per_probe = []
    for probe, logprob, tokens, margin in zip(probes, scores.logprob, scores.tokens, margins):
        sides = {side: {"text": getattr(probe, side), "logprob": float(logprob[s]),
                        "per_token": float(logprob[s] / tokens[s]), "tokens": int(tokens[s])}
                 for s, side in enumerate(SIDES)}
        per_probe.append({"line": probe.line, "prompt": probe.prompt, **({"set": probe.set} if probe.set else {}),
                          **sides, "margin": float(margin), "prefers": preferred(margin)})
    report = {"primary_share": float((margins > 0).mean()), "mean_margin": float(margins.mean()),
              "per_probe": per_probe}
    names = list(dict.fromkeys(probe.set for probe in probes if probe.set))
    if names:  # each named set's figures ("" gathers the probes that name none)
        names += [""] if any(not probe.set for probe in probes) else []
        report["by_set"] = {}
        for name in names:
            rows = np.array([probe.set == name for probe in probes])
            report["by_set"][name] = {"count": int(rows.sum()), "primary_share": float((margins[rows] > 0).mean()),
                                      "mean_margin": float(margins[rows].mean())}
    return report


def count_of(report: dict) -> str:
    """The share of a probe_report as a count: "14 of 24"."""
    probes = report["per_probe"]
    return f"{sum(p['prefers'] == 'primary' for p in probes)} of {len(probes)}"


def flipped(base: dict, adapted: dict) -> list[dict]:
    """The probes whose preferred side changed from `base` to `adapted` (two probe_reports of the same probes)."""
    return [{"line": b["line"], "prompt": b["prompt"], "from": b["prefers"], "to": a["prefers"],
             "base_margin": b["margin"], "adapted_margin": a["margin"]}
            for b, a in zip(base["per_probe"], adapted["per_probe"]) if b["prefers"] != a["prefers"]]


def validation_figures(report: dict) -> dict:
    """What each validation logs of a probe_report."""
    return {"val_probe_primary_share": report["primary_share"], "val_probe_margin": report["mean_margin"]}
