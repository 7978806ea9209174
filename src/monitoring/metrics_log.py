"""metrics.jsonl and TensorBoard scalars: the written record of a run.

`output_dir/metrics.jsonl` holds one JSON object per line, flushed as it is
written, so a crash loses at most the line being written:

    {"step": 10, "objective": 2.31, "ce": 2.2, "lr": 0.0001, ...}  log()
    {"step": 250, "val_ce": 2.05, "val_objective": ...}           log_validation()
    {"event": "end", "reason": "...", ...}               end(), the last line

A number that is not finite (the loss of the step that stopped a run, whose
`end` line says why) is written as null: json_files' rule, no NaN or Infinity
in any file.

With `wandb` (--report-to wandb, monitoring/wandb_log.py), the same numbers go to a
W&B run under the same tags, the end line's to its summary.

TensorBoard scalars go to `output_dir/logs` through tensorboardX's event
writer, in the caller's thread (see TensorBoardWriter for why). Known keys
get grouped tags from TAGS ("objective" -> "train/objective", "val_ce" -> "val/ce");
any other numeric key is logged as "misc/<key>", so nothing passed in is lost
and the known groups stay uncluttered. Non-numeric values (strings) go to the
JSON line only.

Resuming (`resume_step=N`): the lines written after step N by the interrupted
run are dropped (the file is rewritten to a temporary name and renamed over,
so it is whole at every moment), and the TensorBoard writer purges events
after N. The resumed run's record then reads like an uninterrupted one.
A fresh run (`resume_step=None`) moves an existing metrics.jsonl and the
TensorBoard folder aside (never deleting them: `metrics.jsonl.before-<UTC
time>`, `logs.before-<UTC time>`, the time in the one format of everything a
run moves aside, durable.ASIDE_STAMP_FORMAT), so TensorBoard shows the new run alone
instead of dropping its steps as out of order.

A full disk never stops the run from here: a failed write is warned about
once (file and free space) and training goes on while checkpoints commit.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from pathlib import Path

from run_safety.durable import aside_name, aside_stamp, flush_fd, free_space, open_for_append, open_regular_file, replace_file
from run_safety.errors import UserError
from run_safety.json_files import finite_or_none, json_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "logs"

# Each figure named for what it is, the same in metrics.jsonl, TensorBoard, W&B and on the console:
# "objective" is what training minimizes (the cross-entropy weighted by the Empirical Distrust
# objective), "ce" the plain cross-entropy; the validation's are "val_ce" and "val_objective", so
# train/ce against val/ce compares one measure.
TAGS = {
    # training lines (log)
    "objective": "train/objective",
    "ce": "train/ce",
    "distrust": "train/distrust",
    "lr": "train/lr",
    "learning_rate": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec",
    "tokens_processed": "train/tokens_processed",
    "memory_mb": "train/memory_mb",
    "peak_memory_mb": "train/peak_memory_mb",
    # validation lines (log_validation)
    "val_ce": "val/ce",
    "val_ce_low_auth": "val/ce_low_auth",
    "val_ce_high_auth": "val/ce_high_auth",
    "val_objective": "val/objective",
    "val_ce_gap": "val/ce_gap_primary_minus_consensus",
    "val_probe_primary_share": "val/probe_primary_share",
    "val_probe_margin": "val/probe_margin_primary_minus_consensus",
}
# The names of runs written before (metrics.jsonl keys): read as today's (read_metrics).
OLD_NAMES = {"loss": "objective", "val_loss": "val_ce", "val_loss_low_auth": "val_ce_low_auth",
             "val_loss_high_auth": "val_ce_high_auth", "val_loss_gap": "val_ce_gap", "best_val_loss": "best_val_ce"}


# Kept in each JSON line beside today's names, under the names every reader of metrics.jsonl has
# relied on since the first version (scripts, dashboards, mlx-lm habits): "loss" is the objective
# training minimizes and "val_loss" the validation's plain cross-entropy, as they always were.
# JSON lines only: TensorBoard and W&B carry each figure once, under today's tag.
STABLE_KEYS = {"objective": "loss", "val_ce": "val_loss"}


def with_stable_keys(record: dict) -> dict:
    return {**record, **{STABLE_KEYS[key]: value for key, value in record.items() if key in STABLE_KEYS}}


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl, each figure under today's name, whichever names the run
    wrote (a run resumed across the renaming holds both); a line torn by a crash is left out."""
    lines = []
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict):
                lines.append({OLD_NAMES.get(key, key): value for key, value in line.items()})
    return lines


def tag_for(key: str) -> str:
    key = OLD_NAMES.get(key, key)
    return TAGS.get(key, f"misc/{key}")


def _json_value(value):
    """A value as standard JSON can hold it: numbers as int/float, NaN/inf as None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats
        return finite_or_none(float(value))
    return value  # anything else: json_text(default=str) writes its text


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _keep_line(line: str, resume_step: int) -> bool:
    """Keep what the run had written up to and including resume_step."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line torn by the crash
        return False
    if not isinstance(record, dict) or record.get("event") == "end":
        return False
    step = record.get("step")
    return not isinstance(step, int) or step <= resume_step


def truncate_after(path: Path, resume_step: int) -> None:
    """Rewrite `path` keeping only lines with step <= resume_step, atomically.

    UserError (one line) when it cannot be rewritten, for example on a full
    disk: the file is then left as it was and nothing half-written stays.
    """
    try:
        with open_regular_file(path, "r") as f:
            kept = [line for line in f if line.strip() and _keep_line(line, resume_step)]
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read to resume ({_reason(exc)})") from None
    text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
    try:
        replace_file(path, lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise UserError(f"{path}: cannot be rewritten to resume at step {resume_step} ({_reason(exc)}; "
                        f"{free_space(path.parent)}); free some space and run the same command again") from None


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class TensorBoardWriter:
    """Scalars into one TensorBoard event file, written in the caller's thread.

    tensorboardX's SummaryWriter writes from a background thread through a
    bounded queue: when the disk fills, that thread dies with a traceback and
    the next writes block on the full queue for ever (a hung overnight run).
    Its synchronous EventsWriter, fed here with the same Event protos, raises
    an OSError that the caller can handle instead.
    """

    def __init__(self, folder: Path, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        folder.mkdir(parents=True, exist_ok=True)
        # Event file names hold the time in whole seconds and are opened with
        # "wb", so a restart within the same second would overwrite the last
        # one; the nanosecond suffix keeps names unique and in the order
        # TensorBoard reads them (by name), so the purge comes after what it purges.
        self._writer = EventsWriter(str(folder / "events"), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        # TensorBoard hides events at or after `purge_step` in older files: what
        # an interrupted run logged after the step a resume starts from.
        self._writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START),
                                       wall_time=time.time()))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.write_event(self._event(step=step, wall_time=time.time(), summary=self._scalar(tag, value)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLog:
    """metrics.jsonl and TensorBoard. A write that fails (a full disk) is warned
    about once per run, naming the file and the free space, and the run goes
    on: the lines of that time are lost, the file is cut back to its last whole
    line, and later lines are written when there is room again. Losing metrics must never stop
    the training that checkpoints protect."""

    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 warn=None, wandb=None):
        """`wandb`: a monitoring.wandb_log.WandbLog that gets the same figures (and is finished by close)."""
        self.output_dir = Path(output_dir)
        self._wandb = wandb
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        self.warn = warn or (lambda message: print(f"WARNING: {message}", file=sys.stderr, flush=True))
        self._failing: set[str] = set()  # what has failed: each is warned about once per run, not per line

        if resume_step is not None:
            truncate_after(self.path, resume_step)
        else:
            stamp = aside_stamp()
            if self.path.exists() and self.path.stat().st_size > 0:
                os.replace(self.path, aside_name(self.path, "before", stamp))
            logs = self.output_dir / TENSORBOARD_DIR
            if tensorboard and logs.is_dir() and not logs.is_symlink() and any(logs.iterdir()):
                os.replace(logs, aside_name(logs, "before", stamp))
        try:
            self._file = open_for_append(self.path)  # never through a link planted there
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be written ({_reason(exc)}; {free_space(self.output_dir)})") from None
        self._good_size = self._file.tell()  # the end of the last whole line

        self._writer = None
        if tensorboard:
            try:
                self._writer = TensorBoardWriter(self.output_dir / TENSORBOARD_DIR,
                                                 purge_step=0 if resume_step is None else resume_step + 1)
            except OSError as exc:
                self._failed("tensorboard", f"TensorBoard logs in {self.output_dir / TENSORBOARD_DIR} are off for "
                                            f"this run: {_reason(exc)} ({free_space(self.output_dir)})")

    def _failed(self, what: str, message: str) -> None:
        if what not in self._failing:
            self._failing.add(what)
            self.warn(message)

    def _write_line(self, record: dict) -> None:
        record = {key: _json_value(value) for key, value in record.items()}
        line = json_text(record, default=str) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
            self._good_size += len(line.encode("utf-8"))
        except OSError as exc:
            self._failed(METRICS_FILE, f"could not write {self.path} ({_reason(exc)}; {free_space(self.output_dir)}); "
                                       f"metrics lines are lost until it can be written again, checkpoints go on")
            self._cut_back()

    def _cut_back(self) -> None:
        """After a failed write: drop what part of a line reached the file, so the next line starts whole."""
        try:
            self._file.close()
        except OSError:
            pass  # its buffer could not be written either: dropped with the file object
        try:
            self._file = open_for_append(self.path)
            os.ftruncate(self._file.fileno(), self._good_size)
        except OSError:
            pass  # tried again at the next line

    def _write_scalars(self, step: int, scalars: dict) -> None:
        numbers = {tag_for(key): float(value) for key, value in scalars.items() if _is_number(value)}
        if self._wandb is not None and numbers:
            try:
                self._wandb.log(step, numbers)
            except Exception as exc:  # W&B is a copy of this file: it never stops the run
                self._failed("wandb", f"could not log to W&B ({_reason(exc)}); the W&B run is incomplete, "
                                      f"metrics.jsonl has every figure, training goes on")
        if self._writer is None:
            return
        try:
            for tag, value in numbers.items():
                self._writer.add_scalar(tag, value, step)
        except OSError as exc:
            self._failed("tensorboard", f"could not write TensorBoard logs in {self.output_dir / TENSORBOARD_DIR} "
                                        f"({_reason(exc)}; {free_space(self.output_dir)}); they are incomplete for "
                                        f"this run, training goes on")
    def log(self, step: int, **scalars) -> None:
        """One training line: log(step, objective=..., ce=..., lr=..., grad_norm=...)."""
        self._write_line(with_stable_keys({"step": step, **scalars}))
        self._write_scalars(step, scalars)

    def log_validation(self, step: int, **scalars) -> None:
        """One validation line. Keys get a "val_" prefix if they lack one, so
        log_validation(s, ce=x) and log_validation(s, val_ce=x) both
        write val_ce."""
        scalars = {key if key.startswith("val_") else f"val_{key}": v for key, v in scalars.items()}
        self._write_line(with_stable_keys({"step": step, **scalars}))
        self._write_scalars(step, scalars)

    def event(self, step: int, name: str, **fields) -> None:
        """A JSON line only (no TensorBoard scalar): e.g. a checkpoint and how long it took."""
        self._write_line({"step": step, "event": name, **fields})

    def end(self, reason: str, **summary) -> None:
        """The last line: why the run ended, and its summary figures (W&B: the run's summary)."""
        self._write_line({"event": "end", "reason": reason, **summary})
        if self._wandb is not None:
            try:
                self._wandb.summary({"end_reason": reason, **{key: float(value) for key, value in summary.items()
                                                              if _is_number(value) and math.isfinite(value)}})
            except Exception as exc:
                self._failed("wandb", f"could not write the W&B run's summary ({_reason(exc)})")

    def flush(self) -> None:
        """Flush both to disk, e.g. when a checkpoint is committed."""
        try:
            self._file.flush()
            flush_fd(self._file.fileno())
        except OSError as exc:
            self._failed(METRICS_FILE, f"could not flush {self.path} ({_reason(exc)}; {free_space(self.output_dir)})")
            self._cut_back()
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as exc:
                self._failed("tensorboard", f"could not flush TensorBoard logs ({_reason(exc)}; "
                                            f"{free_space(self.output_dir)})")

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        try:
            self._file.close()
        except OSError:
            pass  # warned about by flush
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass  # warned about by flush
            self._writer = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:
                self._failed("wandb", f"could not finish the W&B run ({_reason(exc)})")
            self._wandb = None


class NoMetrics:
    """MetricsLog's interface, writing nothing: the processes of a distributed run other than rank 0."""

    def log(self, step: int, **scalars) -> None:
        pass

    def log_validation(self, step: int, **scalars) -> None:
        pass

    def event(self, step: int, name: str, **fields) -> None:
        pass

    def end(self, reason: str, **summary) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def summary_text(**summary) -> str:
    """The end-of-run summary as a few lines. Known keys (all optional):
    reason, steps, max_steps, tokens (learned), tokens_processed, seconds (in training steps, all sessions),
    session_seconds (this process from its first step to its end, as the progress line's
    elapsed), best_val_ce (best_val_loss in runs of before), best_val_step, adapters (where the adapters were written),
    peak_memory_mb, processes (mlx.launch: tokens are the whole group's, memory rank 0's).
    Others are listed as they are."""
    summary = dict(summary)
    lines = [f"Run ended: {summary.pop('reason', 'unknown reason')}"]
    processes = summary.pop("processes", 1)
    group = f", all {processes} processes" if processes > 1 else ""

    if "steps" in summary:
        steps = summary.pop("steps")
        max_steps = summary.pop("max_steps", None)
        lines.append(f"  steps     {steps}" + (f" / {max_steps}" if max_steps else ""))
    tokens = summary.pop("tokens", None)
    processed = summary.pop("tokens_processed", None)
    seconds = summary.pop("seconds", None)
    if processed:  # the throughput counts every token run through the model; the learned ones beside it
        rate = f" ({processed / seconds:,.0f} tok/s{group})" if seconds else ""
        learned = f", {tokens:,} of them learned" if tokens is not None and tokens != processed else ""
        lines.append(f"  tokens    {processed:,} processed{rate}{learned}")
    elif tokens is not None:  # a run from before the processed tokens were counted
        rate = f" ({tokens / seconds:,.0f} tok/s{group})" if seconds else ""
        lines.append(f"  tokens    {tokens:,}{rate}")
    if seconds is not None:  # the steps alone, summed over every session of the run
        lines.append(f"  time      {_duration(seconds)} in training steps (every session of the run)")
    session = summary.pop("session_seconds", None)
    if session is not None:  # this process, start to end: the clock of the progress line's "elapsed"
        lines.append(f"  elapsed   {_duration(session)} this session, as the progress line counts it (validation, "
                     f"checkpoints and compiling too)")
    if "best_val_loss" in summary:  # a run of before
        summary["best_val_ce"] = summary.pop("best_val_loss")
    if "best_val_ce" in summary:
        best, best_step = summary.pop("best_val_ce"), summary.pop("best_val_step", None)
        if not _is_number(best) or not math.isfinite(best):  # None, NaN, "nan"
            lines.append("  best val  none")
        else:
            at = f" at step {best_step}" if best_step is not None else ""
            lines.append(f"  best val  {best:.4f}{at} (val_ce)")
    if "adapters" in summary:
        lines.append(f"  adapters  {summary.pop('adapters')}")
    if "peak_memory_mb" in summary:
        peak = summary.pop("peak_memory_mb")
        shown = f"{peak / 1000:.2f} GB" if _is_number(peak) and peak >= 1000 else \
            f"{peak:.1f} MB" if _is_number(peak) else str(peak)
        lines.append(f"  memory    {shown} at the peak (MLX{', rank 0' if processes > 1 else ''})")
    for key, value in summary.items():  # aligned with the lines above
        lines.append(f"  {key:<8}  {value:.4g}" if _is_number(value) and not isinstance(value, int)
                     else f"  {key:<8}  {value}")
    return "\n".join(lines)
