"""Base model against adapted model on a data set: did the objective move the
loss of primary sources relative to consensus ones?

    python src/evaluate.py --output-dir RUN [--data-dir DIR] [--checkpoint latest|best|final|PATH]
                           [--batch-size N] [--max-batches N] [--json PATH]
                           [--probes FILE] [--general FILE]

Loads the run's base model exactly as it was trained (quantized on load the
same way), evaluates it, attaches the chosen checkpoint's adapters and
evaluates again, on the same batches. Prints loss and perplexity overall, for
primary (auth_weight < 0.5) and consensus records, and by `source_type`, and
the headline: how much the primary-minus-consensus gap moved. The same
figures go to a JSON file (default RUN/evaluations/<checkpoint>-<data file>.json).

The data file is DIR/test.jsonl, else DIR/val.jsonl, else DIR/valid.jsonl;
DIR defaults to the run's own --data-dir. Every loss is plain cross-entropy
per real target token, so runs trained with any --lambda-weight compare.

Two more measurements, when their files are there: DIR/probes.jsonl and
DIR/general.jsonl are used if they exist; --probes FILE and --general FILE
name others (and are then required to exist).

- Probes (monitoring/probes.py): contested facts, each a neutral prompt with the
  primary source's completion and the consensus's. For base and adapted model:
  how many probes prefer the primary completion ("14 of 24", by summed log-prob
  given the prompt), the mean margin primary minus consensus (nats), each
  probe's prompt and both completions with their summed and per-token log-prob,
  and the probes whose preferred side flipped from base to adapted; by set where
  the probes name one. Asked in each form the model takes: as plain text and
  through its chat template, the form the data's records teach first (the
  headline: plain text for text records). JSON key
  "probes": the headline form's figures, and each form's under "by_form".
- General text: plain text of neither kind (lines {"text": ...}, no scores
  needed); its loss and perplexity, base against adapted, say what the training
  cost on text it was not about. JSON key "general".

On the CPU the base computes as the run's training did (--float-base: float32
copies of its quantized layers where they fit). A part that takes more than a
few seconds shows a progress bar on stderr.
Either is null in the JSON where there is no such file.

Exit codes: 0 done; 2 bad usage or input (one line, nothing written).
"""

from __future__ import annotations

from run_safety.early_interrupt import interrupt_quietly_while_starting  # first: Ctrl+C while starting is one line

if __name__ == "__main__":
    interrupt_quietly_while_starting()

from run_safety.cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from run_safety.errors import OneLineArgumentParser, UserError  # noqa: E402
from run_safety.command import exit_quietly, run_command  # noqa: E402
from run_safety.stop_signals import occupy_closed_standard_streams  # noqa: E402

DATA_FILES = ("test.jsonl", "val.jsonl", "valid.jsonl")  # the first that exists is evaluated


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="evaluate.py",
        description="Base model against the adapted model of a run: loss overall, by authority and by source_type.")
    parser.add_argument("--output-dir", required=True, type=Path, help="the run's folder (its --output-dir)")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with test.jsonl, val.jsonl or valid.jsonl (default: the run's --data-dir)")
    parser.add_argument("--checkpoint", default="latest", metavar="latest|best|final|PATH",
                        help="which checkpoint's adapters (default: latest)")
    parser.add_argument("--allow-changed-base", action="store_true",
                        help="go on with a base whose files changed since the run trained on it (refused otherwise: "
                             "the adapters were trained on the earlier one)")
    parser.add_argument("--batch-size", type=int, help="samples per batch (default: the run's)")
    parser.add_argument("--max-batches", type=int,
                        help="evaluate at most this many batches of the data file, and of the general text "
                             "(default: the whole file)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="where to write the figures (default: RUN/evaluations/<checkpoint>-<data file>.json)")
    parser.add_argument("--probes", type=Path, metavar="FILE",
                        help="contested facts, one JSON line each: {prompt, primary, consensus}; which completion "
                             "each model prefers (default: probes.jsonl of the data folder, if there is one)")
    parser.add_argument("--general", type=Path, metavar="FILE",
                        help="general text, one JSON line each: {text}; its loss, base against adapted (default: "
                             "general.jsonl of the data folder, if there is one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    occupy_closed_standard_streams()  # a launcher's `>&-`: a place where nothing is shown
    args = build_parser().parse_args(argv)

    def work() -> None:
        result = evaluate_run(args)
        print(format_table(result), flush=True)  # the table first: a JSON file that cannot be written loses nothing
        write_figures(result)
        print(f"figures written to {result['json']}", file=sys.stderr)

    return run_command(work)


def evaluate_run(args: argparse.Namespace) -> dict:
    from training.chunked_loss import loss_plan
    from corpus.precheck import first_records
    from base_model.float_base import apply as apply_float_base
    from run_safety.machine import check_writable_folder
    from base_model.lora import attach_lora
    from base_model.loading import load_model
    from base_model.trained_run import open_run
    from monitoring.evaluation import (GENERAL_FILE, compile_row_losses, file_in, loss_report, overall_loss,
                                       sample_losses)
    from monitoring.probes import (PROBE_FILE, encode_probes, forms, model_context, probe_batches, probe_report,
                                   read_probes, score_probes, taught_form)
    from monitoring.progress import work_bar

    run = args.output_dir
    trained = open_run(run, args.checkpoint, "evaluate", args.allow_changed_base)
    config = trained.config
    t = config.training
    batch_size = _positive(args.batch_size, "--batch-size") or t.batch_size
    max_batches = _positive(args.max_batches, "--max-batches")
    data_dir = args.data_dir or Path(config.paths.data_dir)
    data_file = find_data_file(data_dir)
    probes_file = args.probes or file_in(data_dir, PROBE_FILE)
    general_file = args.general or file_in(data_dir, GENERAL_FILE)
    json_path = args.json or run / "evaluations" / f"{trained.checkpoint.name}-{data_file.stem}.json"
    if json_path.exists() and not json_path.is_file():
        raise UserError(f"{json_path}: exists and is not a file")
    if args.json:  # asked for: a place that cannot take it is said now, before minutes of work
        refuse_what_the_run_reads(json_path, trained, data_file, probes_file, general_file)
        check_writable_folder(json_path.parent, f"--json {json_path}")
    else:
        refuse_link_in_run(json_path.parent)
    # What can be checked without the model is, before it loads (minutes for a big base).
    probes = read_probes(probes_file) if probes_file else []
    if general_file:
        first_records(general_file, "general text")

    # The base as it was trained (its quantized copy, or the tiny model rebuilt): as is, it is
    # the model the adapters were trained on.
    loaded = load_model(trained.base.path, config.model.quantize_bits, config.model.trust_remote_code)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    index, batches = _fixed_batches(data_file, tokenizer, t, batch_size, max_batches, pad_id)
    if probes:
        context = model_context(loaded.model)
        # Asked first in the form the records teach (the data file's records are the training's kind).
        probes = encode_probes(probes, probes_file, tokenizer, context, taught_form(*index.learned_tokens()[:2]))
        # As many tokens a batch as a batch of the data (forward only, as here); each form the model takes.
        probe_rows = {form: probe_batches(probes, pad_id, batch_size * t.max_seq_length, context, form)
                      for form in forms(probes)}
    if general_file:
        _, general_batches = _fixed_batches(general_file, tokenizer, t, batch_size, max_batches, pad_id)

    # The inputs checked: on the CPU, compute as training did (float_base.py, the run's --float-base):
    # the quantized form takes a minute a batch on a real model where the float32 copy takes seconds.
    # Said in the JSON ("float_base"), not on stderr: there, after the table, only a failure is.
    float_base, _ = apply_float_base(config.model.float_base, loaded.model)
    plan = loss_plan(loaded.model, t.loss_chunk_size)  # the run's: the logits a chunk of tokens at a time

    def measure(which: str) -> dict:
        """Every figure of the model as it is now, through one compiled forward (a bar on stderr
        for any part that takes more than a few seconds)."""
        row_losses = compile_row_losses(loaded.model, plan)
        figures = {"report": loss_report(sample_losses(loaded.model, row_losses,
                                                       work_bar(batches, f"{which}: {data_file.name}")), index)}
        if probes:
            figures["probes"] = {form: probe_report(probes, score_probes(
                loaded.model, row_losses, work_bar(rows, f"{which}: probes, {form} form"), len(probes)))
                for form, rows in probe_rows.items()}
        if general_file:
            figures["general"] = overall_loss(loaded.model, row_losses,
                                              work_bar(general_batches, f"{which}: general text"))
        return figures

    before = measure("base")
    attach_lora(loaded.model, config.lora.rank, config.lora.alpha, config.lora.layers, config.lora.dropout, t.seed,
                fine_tune_type=config.lora.fine_tune_type, keys=config.lora.keys)  # DoRA's magnitudes too
    loaded.model.load_weights(list(trained.adapters.items()), strict=False)
    after = measure("adapted")
    base, adapted = before["report"], after["report"]

    moved = adapted["gap"] - base["gap"] if adapted["gap"] is not None and base["gap"] is not None else None
    result = {
        "run": str(run), "checkpoint": str(trained.checkpoint), "step": trained.step, "data": str(data_file),
        "base_model": loaded.path, "quantized_bits": loaded.quantized_bits, "float_base": float_base,
        "distrust": {"mode": config.distrust.mode, "lambda": config.distrust.lambda_weight, "alpha": config.distrust.alpha},
        "base": base, "adapted": adapted, "gap_moved": moved,
        "probes": probe_figures(probes_file, probes, before, after) if probes else None,
        "general": {"file": str(general_file), "base": before["general"], "adapted": after["general"]}
        if general_file else None,
    }
    result["json"] = str(json_path)
    result["json_asked"] = args.json is not None
    return result


def probe_figures(path: Path, probes: list, before: dict, after: dict) -> dict:
    """The JSON's "probes": the headline form's base, adapted and flipped (the form the data's
    records teach: monitoring/probes.py, taught_form), and each form's under "by_form"."""
    from monitoring.probes import flipped, forms

    by_form = {form: {"base": before["probes"][form], "adapted": after["probes"][form],
                      "flipped": flipped(before["probes"][form], after["probes"][form])} for form in forms(probes)}
    headline = forms(probes)[0]
    return {"file": str(path), "count": len(probes), "form": headline, **by_form[headline], "by_form": by_form}


def _fixed_batches(path: Path, tokenizer, t, batch_size: int, max_batches: int | None, pad_id: int) -> tuple:
    """(index, batches) of a data file: its records in file order (the first `max_batches`
    batches' worth), each cut to the run's --max-seq-length as training cut them."""
    from corpus.batching import fixed_batches
    from corpus.index import CorpusIndex

    index = CorpusIndex.build(path, tokenizer, t.max_seq_length + 1,
                              limit=batch_size * max_batches if max_batches else None, turns=t.learn_assistant_turns)
    return index, fixed_batches(index, batch_size, math.ceil(len(index) / batch_size), pad_id)


def write_figures(result: dict) -> None:
    """The figures to result["json"], atomically; one line when they cannot be written (a read-only
    run folder: exit 2 with how to write them elsewhere; a full disk: exit 1)."""
    from run_safety.durable import write_text_atomically
    from run_safety.json_files import json_text
    from run_safety.machine import write_fault

    json_path = Path(result["json"])
    figures = {key: value for key, value in result.items() if key not in ("json", "json_asked")}
    try:
        if not result["json_asked"]:
            refuse_link_in_run(json_path.parent)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(json_path, json_text(_finite(figures), indent=2) + "\n")
    except OSError as exc:
        elsewhere = "" if result["json_asked"] else "; --json PATH writes them elsewhere"
        raise write_fault(exc, f"the figures above could not be written to {json_path} "
                               f"({exc.strerror or exc}){elsewhere}") from None


def refuse_what_the_run_reads(json_path: Path, trained, data_file: Path, probes_file: Path | None = None,
                              general_file: Path | None = None) -> None:
    """--json must not replace a file the run reads or wrote: its checkpoints (one would fail its
    manifest), its adapters and logs, the data evaluated (probes and general text too), the base's files."""
    from checkpoints.run_dir import RUN_FILES

    target = json_path.resolve()
    inside = [(trained.run / "checkpoints", "the run's checkpoints"), (Path(trained.base.path), "the base"),
              (Path(trained.base.source), "the base")]
    files = [(trained.run / name, "a file of the run") for name in RUN_FILES] + [(data_file, "the data evaluated"),
                                                                                 (trained.config.train_file,
                                                                                  "the training data")]
    files += [(path, what) for path, what in ((probes_file, "the probe file"), (general_file, "the general text"))
              if path is not None]
    for folder, what in inside:
        if folder.exists() and folder.resolve() in target.parents:
            raise UserError(f"--json {json_path} is inside {what} ({folder}): give another --json PATH")
    for path, what in files:
        if path.exists() and path.resolve() == target:
            raise UserError(f"--json {json_path} is {what}: give another --json PATH")


def refuse_link_in_run(folder: Path) -> None:
    """RUN/evaluations must be the run's own folder: a link planted there would make the figures go
    wherever it points."""
    if folder.is_symlink():
        raise UserError(f"{folder} is a symbolic link; the figures would be written where it points, outside the "
                        f"run folder: remove it, or give --json PATH")


def _positive(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")
    return value


def find_data_file(data_dir: Path) -> Path:
    from run_safety.input_files import dangling_link_above, refuse_if_not_regular

    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data folder (give one with --data-dir){dangling_link_above(data_dir)}")
    for name in DATA_FILES:
        # One that is there but cannot be read is said, not passed over for the next.
        refuse_if_not_regular(data_dir / name, "the data file to evaluate")
        if (data_dir / name).is_file():
            return data_dir / name
    raise UserError(f"{data_dir}: no {', '.join(DATA_FILES[:-1])} or {DATA_FILES[-1]} to evaluate on")




def _finite(value):
    """The figures as the written JSON holds them: a loss or a perplexity that is not finite
    (an overflowing perplexity, a group whose loss is NaN) as null."""
    from run_safety.json_files import finite_or_none

    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return finite_or_none(value)


def format_table(result: dict) -> str:
    base, adapted = result["base"], result["adapted"]
    d = result["distrust"]
    lines = [f"{result['checkpoint']} (step {result['step']}; {d['mode']}, lambda {d['lambda']:g}) "
             f"on {result['data']} ({base['overall']['samples']} samples)",
             f"{'':24}{'samples':>8}  {'base loss':>9} {'ppl':>9}  {'adapted':>9} {'ppl':>9}  {'change':>7}"]

    def row(name: str, b: dict | None, a: dict | None) -> str:
        if b is None or a is None:
            return f"{name:24}{'-':>8}"
        return (f"{name:24}{b['samples']:>8}  {b['loss']:>9.4f} {b['perplexity']:>9.2f}  "
                f"{a['loss']:>9.4f} {a['perplexity']:>9.2f}  {a['loss'] - b['loss']:>+7.4f}")

    lines.append(row("overall", base["overall"], adapted["overall"]))
    lines.append(row("primary (auth < 0.5)", base.get("primary"), adapted.get("primary")))
    lines.append(row("consensus (auth >= 0.5)", base.get("consensus"), adapted.get("consensus")))
    if base["by_source_type"]:
        lines.append("by source_type:")
        for kind in base["by_source_type"]:
            lines.append(row(f"  {kind}", base["by_source_type"][kind], adapted["by_source_type"][kind]))
    if result["gap_moved"] is None:
        lines.append("gap primary - consensus: needs records of both kinds")
    else:
        lines.append(f"gap primary - consensus: base {base['gap']:+.4f}, adapted {adapted['gap']:+.4f}: "
                     f"moved {result['gap_moved']:+.4f} nats")
    general = result.get("general")
    if general:
        lines.append(f"general text: {general['file']} (plain text of neither kind: its loss says what the "
                     f"training cost on text it was not about)")
        lines.append(row("general text", general["base"], general["adapted"]))
    if result.get("probes"):
        lines += probe_table(result["probes"])
    return "\n".join(lines)


def probe_table(probes: dict) -> list[str]:
    """The probes' lines of the table: for each form (the headline first), how many prefer the
    primary version ("14 of 24") and the mean margin, base against adapted, and how many
    flipped; then each probe of the headline form: its prompt, both versions, their summed and
    per-token log-prob, and the side it prefers (`base -> adapted` where that flipped)."""
    from monitoring.probes import FORM_NAMES, SIDES, count_of

    count, headline, by_form = probes["count"], probes["form"], probes["by_form"]
    lines = [f"probes: {probes['file']} ({count} contested facts; a probe prefers the version of higher summed "
             f"log-prob given its prompt)"]
    for form, figures in by_form.items():
        base, adapted, flips = figures["base"], figures["adapted"], figures["flipped"]
        to_side = {side: sum(flip["to"] == side for flip in flips) for side in SIDES}
        lines.append(f"{'headline' if form == headline else 'also'}: asked {FORM_NAMES[form]}")
        lines.append(f"  {'primary preferred':22}{'':8}  {count_of(base):>9} {'':9}  {count_of(adapted):>9} {'':9}  "
                     f"{_primary_count(adapted) - _primary_count(base):>+7d}")
        lines.append(f"  {'mean margin (nats)':22}{'':8}  {base['mean_margin']:>+9.4f} {'':9}  "
                     f"{adapted['mean_margin']:>+9.4f} {'':9}  {adapted['mean_margin'] - base['mean_margin']:>+7.4f}")
        for name, one in base.get("by_set", {}).items():
            other = adapted["by_set"][name]
            lines.append(f"  {'  set ' + (name or '(none)'):22}{'':8}  {_share_count(one):>9} {'':9}  "
                         f"{_share_count(other):>9} {'':9}  margin {one['mean_margin']:+.4f} -> "
                         f"{other['mean_margin']:+.4f}")
        lines.append(f"  flipped: {len(flips)} of {count} ({to_side['primary']} to primary, "
                     f"{to_side['consensus']} to consensus)")
    lines.append(f"each probe ({headline} form): its prompt, then each version's summed log-prob and per token, "
                 f"base and adapted")
    lines.append(f"{'line  version':32}  {'base logp':>9} {'/token':>9}  {'adapted':>9} {'/token':>9}  preferred")
    base, adapted = by_form[headline]["base"], by_form[headline]["adapted"]
    for b, a in zip(base["per_probe"], adapted["per_probe"]):
        lines.append(f"{b['line']:>4}  {b['prompt']!r}")
        for side in SIDES:
            prefers = "" if side != "primary" else b["prefers"] if b["prefers"] == a["prefers"] else \
                f"{b['prefers']} -> {a['prefers']}"
            version = f"{side} {b[side]['text']!r}"
            lines.append(f"      {version:26}  {b[side]['logprob']:>9.4f} {b[side]['per_token']:>9.4f}  "
                         f"{a[side]['logprob']:>9.4f} {a[side]['per_token']:>9.4f}  {prefers}".rstrip())
    return lines


def _share_count(figures: dict) -> str:
    """A set's share as a count ("5 of 12")."""
    return f"{round(figures['primary_share'] * figures['count'])} of {figures['count']}"


def _primary_count(report: dict) -> int:
    return sum(probe["prefers"] == "primary" for probe in report["per_probe"])

if __name__ == "__main__":
    exit_quietly(main())
