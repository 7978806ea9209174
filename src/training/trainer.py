"""DistrustTrainer: the training loop, composed of the parts.

It owns the model, the optimizer and the loop's position; everything else is a
component it calls: the corpus batches (corpus/), the objective (distrust.py),
checkpoints (checkpoints/), early stopping, validation, progress and logs
(monitoring/). The loop reads top to bottom in `fit`.

One optimizer step = `grad_accum` micro-batches, each through one compiled
gradient function (its backward pass started on its own with mx.async_eval,
so that only one pass's activations are held), then one host sync (loss and
gradient norm are needed to decide whether to update at all), then one
compiled update, started with mx.async_eval so that it runs while the host
prepares the next batch.

With several processes (mlx.launch; process_group.py), each rank runs the same
loop on its share of every global batch. The step's gradients are averaged
across ranks inside a compiled function and its figures (loss sums, tokens,
stop signals) summed with them, so every rank sees the same numbers and takes
the same decisions; rank 0 alone writes (checkpoints, adapters, logs, the
progress line), and whether its save worked is broadcast.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from checkpoints import CheckpointCorruptError, CheckpointManager, CheckpointSaveError, TrainingState
from training.chunked_loss import LossPlan, loss_plan
from config import Config, probe_interval
from corpus.batching import Batch, DataPosition, Share, epoch_order, fixed_batches, training_batches
from corpus.index import CorpusIndex
from training.distrust import DistrustObjective, weight_report_lines
from run_safety.durable import free_space
from run_safety.errors import UserError, error_line
from run_safety.file_identity import check_unchanged
from run_safety.host_rng import check_host_rng_state, host_rng_state, set_host_rng_state
from training.memory_check import check_longest_batch
from base_model.lora import adapter_weights
from base_model.weights import names_mismatch, shapes_mismatch
from monitoring.early_stopping import EarlyStopping
from monitoring.evaluation import SampleLosses, compile_row_losses, loss_report, sample_losses
from monitoring.metrics_log import MetricsLog, NoMetrics, summary_text
from monitoring.probes import (Probe, headline_form, model_context, probe_batches, probe_report, probe_tokens,
                               score_probes, validation_figures)
from monitoring.progress import ProgressLine
from monitoring.wandb_log import WandbLog, new_run_id, usable_run_id
from training.optimization import build_optimizer, gradient_function, learning_rate_schedule, step_seed, use_grad_checkpoint
from training.process_group import PeerLost, ProcessGroup
from run_safety.stop_signals import EXIT_CODES, StopRequests

MAX_STEP = 10**12  # more optimizer steps than any run makes: a larger one is a tampered checkpoint
# Saves that fail this many times in a row stop the run: an overnight run that
# cannot checkpoint is a run that can lose everything.
MAX_CONSECUTIVE_SAVE_FAILURES = 3
PROBE_COST_NOTE = 0.1  # probes that cost this share of the training between two scorings are said at the start


class CheckpointingFailed(Exception):
    """Checkpoints could not be written several times in a row (exit 1)."""


@dataclass
class RunEnd:
    reason: str
    exit_code: int = 0


# ---------------------------------------------------------------------------


@dataclass
class CompiledFunctions:
    gradients: object  # (inputs, targets, mask, weights) -> weighted ce sum, ce sum, grads
    global_norm: object  # (grads, tokens) -> gradient norm of the per-token mean
    update: object  # (grads, tokens, norm) -> applies the clipped update
    row_losses: object  # (inputs, targets, mask) -> ce sum per row, eval mode
    reduce: object  # (grads, figures) -> grads averaged over the ranks, figures summed (several processes)


@dataclass
class StepFigures:
    loss: float
    ce: float
    distrust: float
    grad_norm: float
    tokens: int  # the learned ones: the targets the loss counts
    learning_rate: float
    seconds: float
    signal: int | None = None  # a stop signal any rank received (several processes)
    processed: int = 0  # the tokens the step ran through the model, learned or context (padding not counted)


@dataclass
class LoopState:
    """What the loop itself must carry across a resume (beside model and optimizer)."""
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0  # learned
    tokens_processed: int = 0  # learned or context (0 before a resume from a checkpoint that did not count them)
    best_val_loss: float = math.inf
    best_val_step: int | None = None
    last_val_loss: float | None = None
    last_val_step: int | None = None  # the step of last_val_loss: a checkpoint names it only at that step
    last_loss: float | None = None
    train_seconds: float = 0.0


class DistrustTrainer:
    def __init__(self, config: Config, model: nn.Module, tokenizer, adapter_config: dict,
                 train_index: CorpusIndex, val_path: Path | None, output_dir: Path,
                 checkpoints: CheckpointManager, log=print,
                 group: ProcessGroup | None = None, probes: list[Probe] | None = None):
        """`probes` (monitoring/probes.py, tokenized): scored at each validation; a measurement,
        not an input of training (no checkpoint records them)."""
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_config = adapter_config
        self.train_index = train_index
        self.val_path = val_path
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
        self.val_index: CorpusIndex | None = None
        self.val_batches: list[Batch] | None = None
        self.probes = probes or []
        self.probe_every = probe_interval(t.probes)  # validations between probe scorings; 0: never
        self.probe_batches: list[Batch] | None = None
        self.resumed_from: Path | None = None  # the checkpoint restored
        self.restored: TrainingState | None = None
        self.save_failures = 0
        self.last_save_step = 0
        self.last_save_path: Path | None = None
        self.last_save_here = False  # last_save_path is one of this run's checkpoints (the same on every rank)
        self.adapters_written = False  # the top-level adapters were written by this run (the summary names them)
        self._compiled = None
        self.loss_plan: LossPlan | None = None  # how the loss is computed (chunked_loss.py): see _loss_plan
        self.data_summary: dict | None = None  # what the data is, for a "data" line of metrics.jsonl
        self.wandb_run_id: str | None = None  # --report-to wandb: the W&B run, kept in checkpoints
        # How the products are computed (train_qlora.compute_with): the CPU's BLAS and its threads, the
        # base's float copy. Kept in checkpoints: a resume that computes otherwise is not bit for bit.
        self.arithmetic: dict = {}
        # How the user said how long to train, for the line that says the run reached it: "--max-steps
        # 20", or "--iters 20", "iters: 20 (lora.yaml)", "--epochs 2 (20 steps)" (train_qlora.length_said).
        self.length_said: str | None = None

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
        saved_arithmetic = saved.trainer.get("arithmetic")
        saved_arithmetic = saved_arithmetic if isinstance(saved_arithmetic, dict) else {}  # none before it was kept
        changed = [f"{key} {saved_arithmetic[key]} -> {self.arithmetic.get(key)}" for key in sorted(saved_arithmetic)
                   if key in self.arithmetic and saved_arithmetic[key] != self.arithmetic[key]]
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
        _same_arrays("adapters", saved.adapters, adapter_weights(self.model))
        _same_arrays("optimizer state", saved.optimizer, dict(tree_flatten(self.optimizer.state)))
        trainer, t = saved.trainer, self.config.training
        step = _bounded_int(saved.step, "step", 0, MAX_STEP)
        loop = trainer["loop"]
        position = DataPosition.from_dict(loop["position"])
        batches_per_epoch = len(epoch_order(self.train_index.lengths, t.batch_size, t.seed, 0))
        # The data position is a function of the step: step * grad_accum micro-batches in.
        if not 0 <= position.batch < batches_per_epoch or \
                position.epoch * batches_per_epoch + position.batch != step * t.grad_accum:
            raise ValueError(f"data position (epoch {position.epoch}, batch {position.batch}) is not where step "
                             f"{step} leaves a corpus of {batches_per_epoch} batches per epoch")
        best_val_step = loop["best_val_step"]
        best_val_loss = loop["best_val_loss"]  # null: no validation yet (Infinity in older checkpoints)
        state = LoopState(
            step=step,
            position=position,
            tokens_seen=_bounded_int(loop["tokens_seen"], "tokens_seen", 0, 2**62),
            tokens_processed=_bounded_int(loop.get("tokens_processed", 0), "tokens_processed", 0, 2**62),
            best_val_loss=math.inf if best_val_loss is None else _float_or_inf(best_val_loss, "best_val_loss"),
            best_val_step=None if best_val_step is None else _bounded_int(best_val_step, "best_val_step", 0, step),
            last_val_loss=None if trainer["val_loss"] is None else _float_or_inf(trainer["val_loss"], "val_loss"),
            last_val_step=None if trainer["val_loss"] is None else step,
            last_loss=None if trainer["loss"] is None else _float_or_inf(trainer["loss"], "loss"),
            train_seconds=_float_or_inf(loop["train_seconds"], "train_seconds"),
        )
        early_stopping = self._new_early_stopping()
        early_stopping.load_state_dict(trainer["early_stopping"])
        ProgressLine.check_state_dict(trainer["progress"])
        if "losses" not in trainer["early_stopping"]:
            # Written when the plateau window was the progress line's: the same step losses.
            for loss in trainer["progress"]["losses"]:
                early_stopping.record_loss(float(loss))
        check_host_rng_state(trainer["rng"])
        _bounded_int(trainer.get("processes", 1), "processes", 1, 2**20)
        return state, early_stopping, trainer["rng"]

    def training_state(self) -> TrainingState:
        s = self.state
        trainer = {
            "loop": {
                "position": s.position.to_dict(),
                "tokens_seen": s.tokens_seen,
                "tokens_processed": s.tokens_processed,
                "best_val_loss": s.best_val_loss if s.best_val_step is not None else None,  # null: none yet
                "best_val_step": s.best_val_step,
                "train_seconds": s.train_seconds,
            },
            "processes": self.group.size,  # world size: a resume with another continues (see restore)
            "arithmetic": self.arithmetic,  # likewise (see restore)
            "wandb_run_id": self.wandb_run_id,
            "early_stopping": self.early_stopping.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": host_rng_state(),
            "loss": s.last_loss,
            # Only at the step it was measured: a checkpoint between validations has none,
            # nor one whose validation loss was not a number (null, as in metrics.jsonl).
            "val_loss": s.last_val_loss if s.last_val_step == s.step and math.isfinite(s.last_val_loss) else None,
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

    def _compile(self):
        """Build the compiled step after any restore: mx.compile holds the state
        objects it was given, so a later `optimizer.state = ...` would be missed."""
        model, optimizer = self.model, self.optimizer
        max_norm = self.config.training.max_grad_norm
        plan = self._loss_plan()
        # With --grad-checkpoint the gradient pass runs uncompiled: compiled, its graph
        # held more at once (measured on 8 blocks x 1024 tokens: 265 MB peak against
        # 243 MB, at the same step time), and memory is what the option is for.
        gradients = gradient_function(model, plan, compiled=not self.config.training.grad_checkpoint)

        @mx.compile
        def global_norm(grads, tokens):
            squares = [mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)]
            return mx.sqrt(sum(squares)) / tokens

        @partial(mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
        def update(grads, tokens, norm):
            # Mean over the step's tokens, clipped to max_norm with the norm
            # already computed for the checks (no second pass over the grads).
            scale = mx.minimum(1.0, max_norm / (norm + 1e-6)) / tokens
            optimizer.update(model, tree_map(lambda g: g * scale, grads))

        group = self.group

        @mx.compile
        def reduce(grads, figures):
            # One process's gradients are sums over its tokens: their mean over the ranks,
            # divided by the mean tokens per rank, is the global per-token mean.
            return group.average(grads), group.sum(figures)

        # Validation runs the model in eval mode (no dropout), compiled like the step.
        return CompiledFunctions(gradients, global_norm, update, compile_row_losses(model, plan), reduce)

    # -- one optimizer step ---------------------------------------------------

    def _optimizer_step(self, batches, stops: StopRequests | None = None) -> tuple[StepFigures, str | None]:
        """Run one step over `grad_accum` micro-batches; update unless told to stop.
        With several processes, `stops` (this rank's signals) is summed with the step's figures."""
        gradients, global_norm, update = self._compiled.gradients, self._compiled.global_norm, self._compiled.update
        t = self.config.training
        started = time.perf_counter()
        weighted_sum = ce_sum = grads = None
        start_position = self.state.position
        tokens = processed = 0
        auth, entropy = [], []
        for micro in range(t.grad_accum):
            try:
                position, batch = next(batches)
            except UserError:
                self.state.position = start_position  # the step did not happen: it starts here again
                raise
            mx.random.seed(step_seed(t.seed, self.state.step, micro))
            weights = self.objective.weights(batch.auth_weight, batch.prov_entropy) * batch.real_rows
            w_sum, c_sum, g = gradients(mx.array(batch.inputs), mx.array(batch.targets),
                                        mx.array(batch.mask), mx.array(weights))
            if grads is None:
                weighted_sum, ce_sum, grads = w_sum, c_sum, g
            else:
                weighted_sum, ce_sum = weighted_sum + w_sum, ce_sum + c_sum
                grads = tree_map(mx.add, grads, g)
            # Each micro-batch's backward pass on its own: evaluated with the norm below,
            # or with the next micro-batch, MLX schedules them together and holds more at
            # once (measured with --grad-checkpoint, 8 blocks x 1024 tokens: 328 MB peak
            # against 265 MB).
            mx.async_eval(weighted_sum, ce_sum, grads)
            tokens += batch.tokens
            processed += batch.processed
            # The whole global batch's samples (one process: its own real rows).
            auth.append(self.train_index.auth_weight[batch.batch_indices])
            entropy.append(self.train_index.prov_entropy[batch.batch_indices])
            self.state.position = position

        signal_received = None
        if self.group.distributed:
            # Sums over the ranks: loss sums, tokens, and which stop signals arrived anywhere.
            received = [float(stops is not None and stops.signal == sig) for sig in EXIT_CODES]
            totals = mx.concatenate([mx.stack([weighted_sum, ce_sum]),
                                     mx.array([float(tokens), float(processed), *received])])
            grads, totals = self._compiled.reduce(grads, totals)
            weighted_sum, ce_sum = totals[0], totals[1]
            denominator = mx.maximum(totals[2], 1.0) / self.group.size  # mean tokens per rank
        else:
            denominator = mx.array(float(max(tokens, 1)))  # a step of fill rows only has no tokens
        norm = global_norm(grads, denominator)
        # The rate this step's update uses (optimizer.learning_rate still holds the last one's).
        learning_rate = self.schedule(self.optimizer.step)
        try:
            mx.eval(weighted_sum, ce_sum, norm, learning_rate)  # the one sync of the step
        except RuntimeError as exc:
            if self.group.distributed:
                self.state.position = start_position
                raise PeerLost(str(exc)) from None
            raise
        if self.group.distributed:
            counts = np.asarray(totals)
            tokens, processed = int(counts[2]), int(counts[3])
            signal_received = next((sig for sig, count in zip(EXIT_CODES, counts[4:]) if count > 0), None)
        tokens_or_one = max(tokens, 1)
        weighted_ce = weighted_sum.item() / tokens_or_one
        plain_ce = ce_sum.item() / tokens_or_one
        auth, entropy = np.concatenate(auth), np.concatenate(entropy)
        loss = self.objective.objective(weighted_ce, plain_ce, auth, entropy)
        figures = StepFigures(
            loss=loss, ce=plain_ce, distrust=loss - plain_ce, grad_norm=norm.item(), tokens=tokens,
            learning_rate=learning_rate.item(), seconds=0.0, signal=signal_received, processed=processed,
        )
        # Checked before the update: a non-finite or exploding step is never
        # applied, so the last checkpoint holds the last good state.
        stop = self.early_stopping.check_step(self.state.step + 1, loss, figures.grad_norm)
        if stop is None:
            update(grads, denominator, norm)
            # Start computing the update now, while the host reads and pads the
            # next batch; it is waited for by the next step's single sync.
            mx.async_eval(self.model.trainable_parameters(), self.optimizer.state)
        else:
            self.state.position = start_position
        figures.seconds = time.perf_counter() - started
        return figures, stop

    # -- validation -----------------------------------------------------------

    def validate(self) -> dict | None:
        """Plain cross-entropy (comparable across lambdas), the objective, and the
        loss of primary and consensus records, on the same batches every time; with
        probes, when due (--probes), which side they prefer (val_probe_primary_share,
        val_probe_margin). None when there is neither a validation file nor probes due."""
        probes = self._probes_due()
        if self.val_path is None and not probes:
            return None
        result = self._validation_losses() if self.val_path is not None else {}
        if probes:
            result.update(validation_figures(self._probe_report()))
        return result

    def _probes_due(self) -> bool:
        """--probes every N: at the validations of steps that are multiples of N x --eval-steps
        (so a resumed run scores at the same steps), and at the run's last one; off: never."""
        t, step = self.config.training, self.state.step
        if not self.probes or not self.probe_every:
            return False
        return step >= t.max_steps or (step % t.eval_steps == 0 and (step // t.eval_steps) % self.probe_every == 0)

    def _probe_report(self) -> dict:
        """The probes in their headline form (the chat template's, where the model has one),
        scored by the model as it is now through validation's compiled forward in eval mode:
        no dropout, no random draw, the model left in training mode, so a resumed run stays
        bit-identical. Every rank scores them all (a few rows): the same figures."""
        batches = self.progress.work(self._probe_batches(), f"probes ({len(self.probes)})")
        return probe_report(self.probes, score_probes(self.model, self._compiled.row_losses, batches,
                                                      len(self.probes)))

    def _say_probe_cost(self) -> None:
        """At the start: what a probe scoring costs against training, said when it is large (at least
        PROBE_COST_NOTE of the training steps between two scorings). A scoring is a forward pass over
        its tokens, about half a training step over as many (its backward pass computes the adapters'
        gradients, not the base's: about one more forward; measured 0.6 on SmolLM2 on a CPU)."""
        if not self.probes or not self.probe_every:
            return
        t = self.config.training
        batches = self._probe_batches()
        tokens = probe_tokens(batches)
        steps = tokens / (2 * t.batch_size * t.grad_accum * t.max_seq_length)
        between = min(t.eval_steps * self.probe_every, t.max_steps)  # training steps between two scorings
        if steps >= PROBE_COST_NOTE * between:
            every = "every validation" if self.probe_every == 1 else f"every {self.probe_every} validations"
            self.progress.write(
                f"note: scoring the {len(self.probes)} probes ({headline_form(self.probes)} form) runs {tokens:,} "
                f"tokens through the model, about {steps:.1f} training steps' worth, at {every} (--eval-steps "
                f"{t.eval_steps}) and at the end, against {between} steps of training between two scorings; "
                f"--probes 'every N' scores every Nth validation only, --probes off never")

    def _probe_batches(self) -> list[Batch]:
        if self.probe_batches is None:
            t = self.config.training
            # As many tokens a batch as a training batch holds at most (which the memory check measured).
            self.probe_batches = probe_batches(self.probes, self.pad_id, t.batch_size * t.max_seq_length,
                                               model_context(self.model), headline_form(self.probes))
        return self.probe_batches

    def _validation_losses(self) -> dict:
        """The validation file's figures (see validate)."""
        t = self.config.training
        if self.val_batches is None:  # lazy: the val file is first read here
            self.val_index = CorpusIndex.build(self.val_path, self.tokenizer, t.max_seq_length + 1,
                                               limit=t.batch_size * t.val_batches, turns=t.learn_assistant_turns)
            # What was checked at the start is what is validated on (and what the checkpoints record).
            check_unchanged(self.val_path, (self.checkpoints.run_inputs or {}).get("val_content"), "validation file")
            self.val_batches = fixed_batches(self.val_index, t.batch_size, t.val_batches, self.pad_id,
                                             Share(self.group.rank, self.group.size))
        losses = sample_losses(self.model, self._compiled.row_losses, self.progress.work(self.val_batches, "validation"))
        if self.group.distributed:
            # Each rank has its share of the samples: every rank gets them all, by position
            # (the val index holds just the samples validated: it was built with that limit).
            count = len(self.val_index)
            losses = SampleLosses(self.group.gather_rows(losses.ce, losses.positions, count),
                                  self.group.gather_rows(losses.tokens, losses.positions, count),
                                  np.arange(count))
        report = loss_report(losses, self.val_index)
        auth = self.val_index.auth_weight[losses.positions]
        entropy = self.val_index.prov_entropy[losses.positions]
        plain = report["overall"]["loss"]
        weighted = float((losses.ce * self.objective.weights(auth, entropy)).sum() / losses.tokens.sum())
        # Named for what they are (monitoring/metrics_log.py): val_ce compares with the training ce.
        result = {"val_ce": plain, "val_objective": self.objective.objective(weighted, plain, auth, entropy)}
        for name, group in (("val_ce_low_auth", "primary"), ("val_ce_high_auth", "consensus")):
            if group in report:
                result[name] = report[group]["loss"]
        if report["gap"] is not None:
            result["val_ce_gap"] = report["gap"]
        return result

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
        self._compiled = self._compile()
        self._say_probe_cost()
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
        if self.val_path is not None or self.probes:
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


def _same_arrays(what: str, saved: dict, expected: dict) -> None:
    problem = names_mismatch(saved, expected)
    if problem:
        raise ValueError(f"its {what} do not fit this model ({problem})")
    problem = shapes_mismatch(saved, expected, "this model's")
    if problem:
        raise ValueError(f"its {what}: {problem}")


def _bounded_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return value


def _float_or_inf(value, name: str) -> float:
    """A loss or a duration: a number, never NaN or a string (infinity allowed: the best_val_loss
    of a checkpoint written before null meant no validation yet)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)
