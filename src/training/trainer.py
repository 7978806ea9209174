"""DistrustTrainer: the training loop, composed of the parts.

It owns the model, the optimizer and the loop's position; everything else is a
component it calls: the corpus batches (corpus/), the objective (distrust.py),
one optimizer step (step.py), validation and the probes (validation.py), the
loop's checkpointed state and its checks (loop_state.py), checkpoints
(checkpoints/), early stopping, progress and logs (monitoring/). The loop reads
top to bottom in `fit`.

With several processes (mlx.launch; process_group.py), each rank runs the same
loop on its share of every global batch and sees the same figures (step.py), so
every rank takes the same decisions; rank 0 alone writes (checkpoints, adapters,
logs, the progress line), and whether its save worked is broadcast.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from base_model.lora import adapter_weights
from checkpoints import CheckpointCorruptError, CheckpointManager, CheckpointSaveError, TrainingState
from config import Config
from corpus.batching import Share, training_batches
from corpus.index import CorpusIndex
from monitoring.early_stopping import EarlyStopping
from monitoring.metrics_log import MetricsLog, NoMetrics, summary_text
from monitoring.probes import Probe
from monitoring.progress import ProgressLine
from monitoring.wandb_log import WandbLog, new_run_id, usable_run_id
from run_safety.durable import free_space
from run_safety.errors import UserError, error_line
from run_safety.host_rng import check_host_rng_state, host_rng_state, set_host_rng_state
from run_safety.stop_signals import EXIT_CODES, StopRequests
from training.chunked_loss import LossPlan, loss_plan
from training.distrust import DistrustObjective, weight_report_lines
from training.loop_state import LoopState, checked_loop_state, computed_otherwise, last_losses, loop_dict, same_arrays
from training.memory_check import check_longest_batch
from training.optimization import build_optimizer, learning_rate_schedule, use_grad_checkpoint
from training.process_group import PeerLost, ProcessGroup
from training.step import StepFigures, apply_step, compile_functions, compute_step
from training.validation import Validation

# Saves that fail this many times in a row stop the run: an overnight run that
# cannot checkpoint is a run that can lose everything.
MAX_CONSECUTIVE_SAVE_FAILURES = 3


class CheckpointingFailed(Exception):
    """Checkpoints could not be written several times in a row (exit 1)."""


@dataclass
class RunEnd:
    reason: str
    exit_code: int = 0


class DistrustTrainer:
    def __init__(self, config: Config, model: nn.Module, tokenizer, adapter_config: dict,
                 train_index: CorpusIndex, val_path: Path | None, output_dir: Path,
                 checkpoints: CheckpointManager, log=print,
                 group: ProcessGroup | None = None, probes: list[Probe] | None = None,
                 arithmetic: dict | None = None, length_said: str | None = None, data_summary: dict | None = None):
        """`probes` (monitoring/probes.py, tokenized): scored at each validation; a measurement,
        not an input of training (no checkpoint records them). `arithmetic`: how the products are
        computed (command_line/start_lines.compute_with: the CPU's BLAS and its threads, the base's float copy),
        kept in checkpoints, since a resume that computes otherwise is not bit for bit. `length_said`:
        how the user said how long to train, for the line that says the run reached it ("--max-steps
        20", "--iters 20", "iters: 20 (lora.yaml)", "--epochs 2 (20 steps)"). `data_summary`: what
        the data is, for a "data" line of metrics.jsonl."""
        self.config = config
        self.model = model
        self.adapter_config = adapter_config
        self.train_index = train_index
        self.output_dir = Path(output_dir)
        self.checkpoints = checkpoints
        self.group = group or ProcessGroup()
        self.log = log if self.group.is_writer else (lambda message: None)
        t, d = config.training, config.distrust

        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.objective = DistrustObjective(d.alpha, d.lambda_weight, d.mode,
                                           train_index.auth_weight, train_index.prov_entropy)
        self.schedule = learning_rate_schedule(t.learning_rate, t.warmup(), t.max_steps)
        self.optimizer = build_optimizer(t, self.schedule)
        # Materialize the optimizer state now: mx.compile captures the state
        # containers it is given at the first call, and an optimizer initializes
        # lazily at its first update, so state created inside the compiled update
        # would not be the state the next call reads.
        self.optimizer.init(model.trainable_parameters())
        if t.grad_checkpoint:
            use_grad_checkpoint(model)
        self.early_stopping = self._new_early_stopping()
        self.state = LoopState()
        # Until `fit` starts the run's own (which open files and draw the bar), every
        # public method works with these: messages printed plainly, no metrics lines.
        self.metrics: MetricsLog | NoMetrics = NoMetrics()
        self.progress = ProgressLine(t.max_steps, disable=True, quiet=not self.group.is_writer)
        self.validation = Validation(t, tokenizer, self.objective, val_path,
                                     (checkpoints.run_inputs or {}).get("val_content"), probes or [], self.pad_id,
                                     self.group)
        self.resumed_from: Path | None = None  # the checkpoint restored
        self.restored: TrainingState | None = None
        self.save_failures = 0
        self.last_save_step = 0
        self.last_save_path: Path | None = None
        self.last_save_here = False  # last_save_path is one of this run's checkpoints (the same on every rank)
        self.adapters_written = False  # the top-level adapters were written by this run (the summary names them)
        self._compiled = None
        self.loss_plan: LossPlan | None = None  # how the loss is computed (chunked_loss.py): see _loss_plan
        self.data_summary = data_summary
        self.wandb_run_id: str | None = None  # --report-to wandb: the W&B run, kept in checkpoints
        self.arithmetic = arithmetic or {}
        self.length_said = length_said

    def _new_early_stopping(self) -> EarlyStopping:
        t, es = self.config.training, self.config.early_stopping
        return EarlyStopping(
            patience=es.patience, min_delta=es.min_delta, warmup_steps=t.warmup(),
            grad_spike_threshold=es.grad_spike_threshold, grad_spike_patience=es.grad_spike_patience,
            plateau_enabled=es.enabled, window=es.window,
        )

    # -- resume -------------------------------------------------------------

    def restore(self, saved: TrainingState, source: Path) -> None:
        """Put back everything a checkpoint holds; call before `fit`.

        Everything is checked before anything is changed: a checkpoint whose
        files verify but whose content this run cannot use (tampered JSON
        with a matching manifest, another model's adapters, a data position
        outside the corpus) raises CheckpointCorruptError, like a damaged one,
        and leaves the trainer as it was, so an older checkpoint can be tried.
        """
        try:
            loop, early_stopping, rng = self._checked_state(saved)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
            raise CheckpointCorruptError(f"checkpoint {source} holds a state this run cannot use: "
                                         f"{type(exc).__name__}: {exc}") from None
        self.model.load_weights(list(saved.adapters.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(saved.optimizer.items()))
        self.state = loop
        self.early_stopping = early_stopping
        self.progress.load_state_dict(saved.trainer["progress"])
        set_host_rng_state(rng)
        self.last_save_step = saved.step
        self.last_save_path = Path(source)
        self.last_save_here = self.last_save_path.parent.resolve() == self.checkpoints.directory.resolve()
        self.resumed_from = Path(source)
        self.wandb_run_id = usable_run_id(saved.trainer.get("wandb_run_id"))  # resumed: the same W&B run
        if self.group.distributed:
            self.restored = saved  # for share_resume_point: the other ranks take the same
        saved_processes = saved.trainer.get("processes", 1)
        if saved_processes != self.group.size:
            # The global batch and the data position do not depend on the world size: the
            # run continues as the same run; only float rounding differs (summation order).
            self.log(f"note: checkpoint {source} was written by a run of {saved_processes} process(es), this one "
                     f"has {self.group.size}: training continues with the same global batch (--batch-size "
                     f"{self.config.training.batch_size}); the result equals the uninterrupted run's up to float "
                     f"rounding, not bit for bit")
        changed = computed_otherwise(saved.trainer.get("arithmetic"), self.arithmetic)
        if changed:
            self.log(f"note: checkpoint {source} was written by a run that computed otherwise ({'; '.join(changed)}): "
                     f"training continues as the same run; the result equals the uninterrupted run's up to float "
                     f"rounding, not bit for bit")
        mx.eval(self.model.parameters(), self.optimizer.state)

    def share_resume_point(self) -> None:
        """Several processes: rank 0 alone chose and restored a checkpoint (or none);
        every other rank takes that same state from it, never from its own reading
        of the output dir (on another machine there is none). Call on every rank."""
        if not self.group.distributed:
            return
        saved = self.restored
        header = self.group.broadcast_json(None if not self.group.is_writer else {
            "source": str(self.resumed_from) if self.resumed_from else None, "here": self.last_save_here,
            "step": saved.step if saved else None, "trainer": saved.trainer if saved else None})
        if header["source"] is None:
            return
        own_adapters, own_optimizer = adapter_weights(self.model), dict(tree_flatten(self.optimizer.state))
        adapters = self.group.broadcast_arrays(saved.adapters if saved else None, like=own_adapters)
        optimizer = self.group.broadcast_arrays(saved.optimizer if saved else None, like=own_optimizer)
        if not self.group.is_writer:
            self.restore(TrainingState(step=header["step"], adapters=adapters, optimizer=optimizer,
                                       trainer=header["trainer"], config=self.config.to_dict(),
                                       fingerprint=self.config.fingerprint(), adapter_config=self.adapter_config),
                         Path(header["source"]))
            self.last_save_here = header["here"]
        self.restored = None

    def _checked_state(self, saved: TrainingState) -> tuple[LoopState, EarlyStopping, dict]:
        """What `restore` will put back, each part checked against this run (types, ranges,
        shapes, the data position against the corpus); raises on the first problem."""
        same_arrays("adapters", saved.adapters, adapter_weights(self.model))
        same_arrays("optimizer state", saved.optimizer, dict(tree_flatten(self.optimizer.state)))
        trainer, t = saved.trainer, self.config.training
        loop = checked_loop_state(saved.step, trainer, self.train_index.lengths, t.batch_size, t.seed, t.grad_accum)
        early_stopping = self._new_early_stopping()
        early_stopping.load_state_dict(trainer["early_stopping"])
        ProgressLine.check_state_dict(trainer["progress"])
        if "losses" not in trainer["early_stopping"]:
            # Written when the plateau window was the progress line's: the same step losses.
            for loss in trainer["progress"]["losses"]:
                early_stopping.record_loss(float(loss))
        check_host_rng_state(trainer["rng"])
        return loop, early_stopping, trainer["rng"]

    def training_state(self) -> TrainingState:
        s = self.state
        trainer = {
            "loop": loop_dict(s),
            "processes": self.group.size,  # world size: a resume with another continues (see restore)
            "arithmetic": self.arithmetic,  # likewise (see restore)
            "wandb_run_id": self.wandb_run_id,
            "early_stopping": self.early_stopping.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": host_rng_state(),
            **last_losses(s),
        }
        return TrainingState(
            step=s.step,
            adapters=adapter_weights(self.model),
            optimizer=dict(tree_flatten(self.optimizer.state)),
            trainer=trainer,
            config=self.config.to_dict(),
            fingerprint=self.config.fingerprint(),
            adapter_config=self.adapter_config,
        )

    # -- compiled functions ---------------------------------------------------

    def _loss_plan(self) -> LossPlan:
        """--loss-chunk-size for this model (a probe of its output layer), found once."""
        if self.loss_plan is None:
            self.loss_plan = loss_plan(self.model, self.config.training.loss_chunk_size)
            if self.loss_plan.note:
                self.log(f"note: {self.loss_plan.note}")
        return self.loss_plan

    def check_memory(self) -> None:
        """The pre-flight, before `fit` (memory_check.py): the longest batch's peak memory in
        one line, or a UserError naming settings measured to fit. Call on every rank."""
        t = self.config.training
        if t.memory_check and self.state.step < t.max_steps:
            check_longest_batch(self.model, self._loss_plan(), t, self.train_index, self.pad_id, self.group,
                                self.log)

    # -- one optimizer step ---------------------------------------------------

    def _optimizer_step(self, batches, stops: StopRequests | None = None) -> tuple[StepFigures, str | None]:
        """Run one step over `grad_accum` micro-batches (step.py); update unless told to stop.
        Checked before the update: a non-finite or exploding step is never applied, so the last
        checkpoint holds the last good state, and the data position stays where the step began."""
        t = self.config.training
        # The rate this step's update uses (optimizer.learning_rate still holds the last one's).
        computed = compute_step(self._compiled, batches, t.grad_accum, t.seed, self.state.step, self.objective,
                                self.train_index, self.group, self.schedule(self.optimizer.step), stops)
        figures = computed.figures
        stop = self.early_stopping.check_step(self.state.step + 1, figures.loss, figures.grad_norm)
        if stop is None:
            apply_step(self._compiled, computed, self.model, self.optimizer)
            self.state.position = computed.position
        figures.seconds = time.perf_counter() - computed.started
        return figures, stop

    # -- validation -----------------------------------------------------------

    def validate(self) -> dict | None:
        """The validation figures at this step (validation.py); None when there is neither a
        validation file nor probes due."""
        return self.validation.run(self.state.step, self.model, self._compiled.row_losses, self.progress)

    # -- saving -----------------------------------------------------------------

    def save_checkpoint(self, *, is_best: bool = False, is_final: bool = False) -> bool:
        """Commit a checkpoint; on failure warn loudly and carry on (a few times)."""
        started = time.perf_counter()
        path = failure = None
        if self.group.is_writer:
            try:
                path = self.checkpoints.save(self.training_state(), is_best=is_best, is_final=is_final)
            except CheckpointSaveError as exc:
                failure = str(exc)
        # Rank 0 saves; every rank counts its failures alike, so all stop together.
        failure = self.group.broadcast_json(failure)
        if failure is not None:
            self.save_failures += 1
            self.progress.write(f"WARNING: checkpoint at step {self.state.step} failed ({failure}); "
                                f"retrying at the next interval")
            if self.save_failures >= MAX_CONSECUTIVE_SAVE_FAILURES:
                raise CheckpointingFailed(
                    f"{self.save_failures} checkpoint saves failed in a row, the last: {failure}") from None
            return False
        self.save_failures = 0
        self.last_save_step, self.last_save_here = self.state.step, True
        if not self.group.is_writer:
            return True
        self.last_save_path = path
        self.write_adapters(path)
        self.metrics.event(self.state.step, "checkpoint", path=str(path), seconds=time.perf_counter() - started,
                           best=is_best, final=is_final)
        self.metrics.flush()
        self.progress.write(f"checkpoint: {path}")
        return True

    def write_adapters(self, checkpoint: Path) -> None:
        """The newest adapters at the top of the output dir, loadable by mlx_lm; a
        failure is a warning (the checkpoint holds them)."""
        try:
            self.checkpoints.export_adapters(checkpoint, self.output_dir)
            self.adapters_written = True
        except OSError as exc:
            self.progress.write(f"WARNING: could not update {self.output_dir / 'adapters.safetensors'} "
                                f"({exc.strerror or exc}; {free_space(self.output_dir)}); checkpoint {checkpoint} "
                                f"holds the same adapters")

    # -- the loop ---------------------------------------------------------------

    def fit(self) -> RunEnd:
        t, s, writer = self.config.training, self.state, self.group.is_writer
        if writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from and s.step < t.max_steps:
            # A resumed run whose next checkpoint cannot fit would train for nothing: say so first.
            self.group.on_writer(lambda: self.checkpoints.check_room_like(self.resumed_from))
        self.metrics = MetricsLog(self.output_dir, tensorboard=self.config.paths.tensorboard,
                                  resume_step=s.step if self.resumed_from else None,
                                  wandb=self._open_wandb()) if writer else NoMetrics()
        index = self.train_index
        weights = self.objective.weight_report(index.auth_weight, index.prov_entropy,
                                               index.source_type, index.source_type_names)
        for line in weight_report_lines(weights):
            self.log(line)
        if not self.resumed_from:
            self.metrics.event(0, "distrust_weights", **weights)
            if self.data_summary:
                self.metrics.event(0, "data", **self.data_summary)
        # A run with nothing left to do draws no bar (it would show the same line twice).
        windows = self.progress.state_dict()  # the restored smoothing windows, if any
        self.progress = ProgressLine(t.max_steps, initial_step=s.step, disable=s.step >= t.max_steps,
                                     memory_baseline_step=self._memory_baseline_step(), quiet=not writer,
                                     processes=self.group.size)
        self.progress.load_state_dict(windows)
        session_started = time.perf_counter()  # what the progress line's "elapsed" counts from
        if self.resumed_from and writer:
            self.checkpoints.protect(self.resumed_from)
        self._compiled = compile_functions(self.model, self.optimizer, self._loss_plan(), t.max_grad_norm,
                                           t.grad_checkpoint, self.group)
        note = self.validation.probe_cost_note(self.model)
        if note:
            self.progress.write(note)
        batches = training_batches(self.train_index, t.batch_size, t.seed, s.position, self.pad_id,
                                   Share(self.group.rank, self.group.size))
        self.model.train()
        end = None
        with StopRequests() as stops:
            try:
                if self.resumed_from and writer:
                    self._reconcile_bookkeeping(self.resumed_from)
                if s.step >= t.max_steps:
                    # Committed already: only `final` (and the bookkeeping above) to make agree.
                    end = self._end_with_checkpoint(
                        RunEnd(f"already at step {s.step} of --max-steps {t.max_steps}; nothing to do"))
                while end is None:
                    end = self._one_step(batches, stops)
            except UserError:
                # Bad data found mid-run (a val file read at the first validation, a
                # training file changed under a streaming run): keep the steps done.
                # With several processes only this rank knows: saving would wait on the others.
                if s.step > self.last_save_step and not self.group.distributed:
                    self.save_checkpoint()
                self.metrics.end(f"stopped at step {s.step}: bad input", steps=s.step)
                self.metrics.close()
                raise
            except Exception as exc:
                if isinstance(exc, PeerLost) and self.group.is_writer:
                    # Now, inside StopRequests: mlx.launch's SIGTERM, close behind, only sets a flag here.
                    self.log(error_line(exc))
                    exc.reported = True
                # Even a run that fails says why in its last line.
                self.metrics.end(f"error at step {s.step}: {exc}", steps=s.step)
                self.metrics.close()
                raise
            finally:
                self.progress.close()
        summary = {
            "steps": s.step, "max_steps": t.max_steps, "tokens": s.tokens_seen, "tokens_processed": s.tokens_processed,
            "seconds": s.train_seconds,
            "best_val_ce": s.best_val_loss if s.best_val_step is not None else None,
            "best_val_step": s.best_val_step,
            "adapters": str(self.output_dir / "adapters.safetensors") if self.adapters_written else
            "none written (no checkpoint could be saved)",
            "peak_memory_mb": round(mx.get_peak_memory() / 1e6, 1), "processes": self.group.size,
            "session_seconds": time.perf_counter() - session_started,
        }
        self.metrics.end(end.reason, **summary)
        self.metrics.close()
        self.log(summary_text(reason=end.reason, **summary))  # rank 0 only: the others' log is quiet
        return end

    def _open_wandb(self):
        """--report-to wandb: the W&B run (this run's, continued on a resume); None otherwise."""
        if self.config.paths.report_to != "wandb":
            return None
        resumed = self.wandb_run_id is not None
        self.wandb_run_id = self.wandb_run_id or new_run_id()
        return WandbLog(self.output_dir, self.wandb_run_id, self.config.paths.project_name, self.config.to_dict(),
                        resumed, log=self.log)

    def _one_step(self, batches, stops: StopRequests) -> RunEnd | None:
        """One optimizer step and what follows it (log, validate, save); the run's end, or None to go on."""
        t, s = self.config.training, self.state
        figures, stop = self._optimizer_step(batches, stops)
        if stop is not None:
            # The update was not applied: the state is that of the last good step.
            self.metrics.log(s.step + 1, objective=figures.loss, ce=figures.ce, grad_norm=figures.grad_norm)
            return self._end_with_checkpoint(RunEnd(stop))
        s.step += 1
        s.tokens_seen += figures.tokens
        s.tokens_processed += figures.processed
        s.train_seconds += figures.seconds
        s.last_loss = figures.loss
        self.early_stopping.record_loss(figures.loss)
        memory, peak = mx.get_active_memory(), mx.get_peak_memory()
        self.metrics.log(s.step, objective=figures.loss, ce=figures.ce, distrust=figures.distrust,
                         lr=figures.learning_rate, grad_norm=figures.grad_norm,
                         tokens=figures.tokens, tokens_processed=figures.processed,
                         tokens_per_sec=figures.processed / max(figures.seconds, 1e-9),
                         memory_mb=memory / 1e6, peak_memory_mb=peak / 1e6)
        self.progress.update(s.step, figures.loss, figures.ce, figures.processed, figures.seconds,
                             peak, s.step - self.last_save_step)

        finished = s.step >= t.max_steps
        is_best = False
        if s.step % t.eval_steps == 0 or finished:
            is_best = self._validation_check()
            # A plateau is judged on a full smoothing window only (early stopping's
            # own, --early-stopping-window): the objective is noisy from batch to batch.
            if s.step % t.eval_steps == 0:
                stop = self.early_stopping.check_plateau_now(s.step)
        end = None
        if stop is not None:
            end = RunEnd(stop)
        elif finished:
            end = RunEnd(f"finished: reached {self.length_said or f'--max-steps {t.max_steps}'}")
        elif (received := self._stop_signal(stops, figures)) is not None:
            end = RunEnd(f"interrupted by {signal.Signals(received).name} at step {s.step}", EXIT_CODES[received])
        if end is not None:
            return self._end_with_checkpoint(end, is_best=is_best)
        if is_best or s.step % t.checkpoint_interval == 0:
            self.save_checkpoint(is_best=is_best)
        return None

    def _stop_signal(self, stops: StopRequests, figures: StepFigures) -> int | None:
        """The stop signal to act on now: this process's own, or with several processes the
        one summed with the step's figures (so every rank stops at the same step)."""
        return figures.signal if self.group.distributed else stops.signal

    def _memory_baseline_step(self) -> int:
        """The step from which this process's memory growth is measured: right after its first
        validation has allocated what it needs (its batches, its compiled forward), and at
        least 5 steps in (the first steps compile and allocate)."""
        t, s = self.config.training, self.state
        after = [s.step + 5]
        if self.validation.anything:
            after.append((s.step // t.eval_steps + 1) * t.eval_steps + 1)
        return max(after)

    def _reconcile_bookkeeping(self, resumed: Path) -> None:
        """After a resume: make the top-level adapters and the `best` pointer agree with the
        committed checkpoints. A kill between a commit and its bookkeeping (the copy of the
        adapters, the pointers) would otherwise leave the previous step's adapters exported."""
        if resumed.parent.resolve() != self.checkpoints.directory.resolve():
            return  # resumed from a checkpoint elsewhere: this run's own saves do the bookkeeping
        self.write_adapters(resumed)
        best_step = self.state.best_val_step
        if best_step is not None:
            self.checkpoints.mark_best_step(best_step)

    def _end_with_checkpoint(self, end: RunEnd, is_best: bool = False) -> RunEnd:
        """The final checkpoint; a run whose last state could not be saved has not succeeded."""
        if self.last_save_step == self.state.step and self.last_save_here:
            # This very state is committed already (a stop right after a save,
            # or nothing left to do): point `final` at it rather than save it again.
            if self.group.is_writer:
                self.checkpoints.mark_final(self.last_save_path)
            return end
        if self.save_checkpoint(is_best=is_best, is_final=True):
            return end
        newest = f"the newest saved one is step {self.last_save_step}" if self.last_save_path is not None else \
            "no checkpoint was saved"
        return RunEnd(f"{end.reason}; but the final checkpoint could not be saved ({newest})", exit_code=1)

    def _validation_check(self) -> bool:
        """Validate, log, and say whether this is the best validation so far."""
        s = self.state
        result = self.validate()  # a bad val file raises UserError: fit keeps the steps done
        if result is None:
            return False
        self.metrics.log_validation(s.step, **result)
        parts = "  ".join(f"{k}={v:.4f}" for k, v in result.items())
        self.progress.write(f"step {s.step}: {parts}")
        if "val_ce" not in result:  # probes only, no validation file: nothing to call best
            return False
        s.last_val_loss, s.last_val_step = result["val_ce"], s.step
        if math.isfinite(result["val_ce"]) and result["val_ce"] < s.best_val_loss:
            s.best_val_loss, s.best_val_step = result["val_ce"], s.step
            return True
        return False
