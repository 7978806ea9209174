"""Weights & Biases (`--report-to wandb`): the figures of metrics.jsonl, as a W&B run too.

What goes to W&B is what goes to TensorBoard: every number of each training and
validation line of metrics.jsonl, at its step, under the same name ("train/objective",
"train/ce", "val/ce": metrics_log.TAGS); the end line's numbers go to the run's summary. The
run is named after the output folder, its config is the run's Config, its project
is --project-name (mlx-lm's `project_name`), else W&B's default.

A resumed run continues the same W&B run: its id is kept in every checkpoint (the
trainer state's `wandb_run_id`) and given back to wandb.init with resume="allow".
A fresh run, or one resumed from a checkpoint written without W&B, gets a new id.

Where the files go: wandb.init(dir=OUTPUT) puts W&B's own folder in OUTPUT/wandb/
(`offline-run-<time>-<id>/run-<id>.wandb` with WANDB_MODE=offline, which
`wandb sync OUTPUT/wandb/offline-run-*` uploads later; `run-<time>-<id>/` online).
W&B's service process writes a debug log under $XDG_CACHE_HOME/wandb/logs (that is
~/.cache): while the run starts, XDG_CACHE_HOME points at OUTPUT, so that log lands
in OUTPUT/wandb/logs/ too. W&B's system monitor is off: its own process logs to
~/.cache whatever XDG_CACHE_HOME says, and memory and tokens/s are among the run's
figures anyway. So an offline run writes nothing outside the output folder (a test
checks it with HOME pointed at an empty folder). Console capture is off (the
progress line stays ours), and W&B's own messages are silenced: one line says
where the run is.

W&B failing during the run (a network error online, say) is warned about once and
the run goes on: it is a copy of metrics.jsonl, never a reason to stop training.
A W&B run that cannot start at all stops the run before its first step (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import string
import sys
from pathlib import Path

from run_safety.errors import UserError, one_line

RUN_ID = re.compile(r"[a-z0-9]{1,64}")  # what we write; anything else in a checkpoint is not ours


# How to install W&B, the same words wherever it is said (--help, the error, the docs): the
# project's extra beside the MLX backend's, as pyproject.toml's extras name them.
WANDB_INSTALL = 'pip install ".[cpu,wandb]" (Linux CPU; ".[cuda,wandb]" with NVIDIA, ".[wandb]" on a Mac)'


def check_wandb_installed() -> None:
    """One line, exit 2, before anything else happens, when the wandb package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"--report-to wandb: the wandb package is not installed here; install it with "
                        f"{WANDB_INSTALL}") from None


def new_run_id() -> str:
    """A W&B run id; from the system's randomness, so training's seeded generators are not touched."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def usable_run_id(value) -> str | None:
    """The run id a checkpoint holds, if it is one this code wrote; else None (a new W&B run)."""
    return value if isinstance(value, str) and RUN_ID.fullmatch(value) else None


@contextlib.contextmanager
def _cache_home(folder: Path):
    """XDG_CACHE_HOME = `folder` while W&B starts its service (which logs under it)."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved


class WandbLog:
    """One W&B run, written by rank 0 alongside metrics.jsonl (MetricsLog calls it)."""

    def __init__(self, output_dir: Path, run_id: str, project: str, config: dict, resumed: bool, log=None):
        import wandb

        output_dir = Path(output_dir).resolve()
        output_dir.mkdir(parents=True, exist_ok=True)
        # No console capture (the progress line stays ours), no system monitor (its process logs to
        # ~/.cache whatever XDG_CACHE_HOME says; memory and tokens/s are among the run's own figures).
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        try:
            with _cache_home(output_dir):
                self.run = wandb.init(project=project or None, dir=str(output_dir), id=run_id, resume="allow",
                                      name=output_dir.name, config=config, settings=settings)
        except Exception as exc:  # wandb raises its own kinds (no API key, no network, ...)
            raise UserError(f"--report-to wandb: W&B could not start ({one_line(str(exc))[:300]}); "
                            f"WANDB_MODE=offline logs without network, for wandb sync later") from None
        offline = self.run.settings.mode == "offline"
        where = f"offline, in {Path(self.run.dir).parent} (wandb sync uploads it)" if offline else \
            (self.run.url or "online")
        (log or (lambda message: print(message, file=sys.stderr)))(
            f"W&B: {'continuing' if resumed else 'new'} run {run_id} ({where})")

    def log(self, step: int, figures: dict) -> None:
        self.run.log(figures, step=step)

    def summary(self, figures: dict) -> None:
        self.run.summary.update(figures)

    def finish(self, exit_code: int = 0) -> None:
        import wandb

        self.run.finish(exit_code=exit_code)
        wandb.teardown()  # its service ends with the run (a next run in this process starts its own)
