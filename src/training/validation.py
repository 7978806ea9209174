"""Validation during training: the validation file's losses and the probes.

Plain cross-entropy (comparable across lambdas), the objective, and the loss
of primary and consensus records, on the same batches every time; with probes,
when due (--probes), which side of each contested fact the model prefers
(val_probe_primary_share, val_probe_margin). Both run through validation's
compiled forward in eval mode: no dropout, no random draw, so a resumed run
stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from config import TrainingConfig, probe_interval
from corpus.batching import Batch, Share, fixed_batches
from corpus.index import CorpusIndex
from monitoring.evaluation import SampleLosses, loss_report, sample_losses
from monitoring.probes import (Probe, headline_form, model_context, probe_batches, probe_report, probe_tokens,
                               score_probes, validation_figures)
from run_safety.file_identity import check_unchanged
from training.distrust import DistrustObjective
from training.process_group import ProcessGroup

PROBE_COST_NOTE = 0.1  # probes that cost this share of the training between two scorings are said at the start


class Validation:
    def __init__(self, training: TrainingConfig, tokenizer, objective: DistrustObjective, val_path: Path | None,
                 val_content: dict | None, probes: list[Probe], pad_id: int, group: ProcessGroup):
        """`val_content`: the validation file's identity as checked at the start (the checkpoints'
        run inputs); what is validated on must be that file. `probes` (monitoring/probes.py,
        tokenized): a measurement, not an input of training (no checkpoint records them)."""
        self.training = training
        self.tokenizer = tokenizer
        self.objective = objective
        self.val_path = val_path
        self.val_content = val_content
        self.probes = probes
        self.probe_every = probe_interval(training.probes)  # validations between probe scorings; 0: never
        self.pad_id = pad_id
        self.group = group
        self.val_index: CorpusIndex | None = None
        self.val_batches: list[Batch] | None = None
        self._probe_batches: list[Batch] | None = None

    @property
    def anything(self) -> bool:
        """Whether a validation can have anything to measure (a file, or probes)."""
        return self.val_path is not None or bool(self.probes)

    def run(self, step: int, model, row_losses, progress) -> dict | None:
        """The figures at `step`; None when there is neither a validation file nor probes due.
        `row_losses`: the compiled eval-mode forward; `progress` shows work over a few seconds."""
        probes = self.probes_due(step)
        if self.val_path is None and not probes:
            return None
        result = self._losses(model, row_losses, progress) if self.val_path is not None else {}
        if probes:
            batches = progress.work(self.probe_batches(model), f"probes ({len(self.probes)})")
            # Every rank scores them all (a few rows): the same figures.
            result.update(validation_figures(probe_report(self.probes, score_probes(model, row_losses, batches,
                                                                                    len(self.probes)))))
        return result

    def probes_due(self, step: int) -> bool:
        """--probes every N: at the validations of steps that are multiples of N x --eval-steps
        (so a resumed run scores at the same steps), and at the run's last one; off: never."""
        t = self.training
        if not self.probes or not self.probe_every:
            return False
        return step >= t.max_steps or (step % t.eval_steps == 0 and (step // t.eval_steps) % self.probe_every == 0)

    def probe_cost_note(self, model) -> str | None:
        """At the start: what a probe scoring costs against training, when it is large (at least
        PROBE_COST_NOTE of the training steps between two scorings). A scoring is a forward pass over
        its tokens, about half a training step over as many (its backward pass computes the adapters'
        gradients, not the base's: about one more forward; measured 0.6 on SmolLM2 on a CPU)."""
        if not self.probes or not self.probe_every:
            return None
        t = self.training
        tokens = probe_tokens(self.probe_batches(model))
        steps = tokens / (2 * t.batch_size * t.grad_accum * t.max_seq_length)
        between = min(t.eval_steps * self.probe_every, t.max_steps)  # training steps between two scorings
        if steps < PROBE_COST_NOTE * between:
            return None
        every = "every validation" if self.probe_every == 1 else f"every {self.probe_every} validations"
        return (f"note: scoring the {len(self.probes)} probes ({headline_form(self.probes)} form) runs {tokens:,} "
                f"tokens through the model, about {steps:.1f} training steps' worth, at {every} (--eval-steps "
                f"{t.eval_steps}) and at the end, against {between} steps of training between two scorings; "
                f"--probes 'every N' scores every Nth validation only, --probes off never")

    def probe_batches(self, model) -> list[Batch]:
        if self._probe_batches is None:
            t = self.training
            # As many tokens a batch as a training batch holds at most (which the memory check measured).
            self._probe_batches = probe_batches(self.probes, self.pad_id, t.batch_size * t.max_seq_length,
                                                model_context(model), headline_form(self.probes))
        return self._probe_batches

    def _losses(self, model, row_losses, progress) -> dict:
        """The validation file's figures (see the module's text)."""
        t = self.training
        if self.val_batches is None:  # lazy: the val file is first read here
            self.val_index = CorpusIndex.build(self.val_path, self.tokenizer, t.max_seq_length + 1,
                                               limit=t.batch_size * t.val_batches, turns=t.learn_assistant_turns)
            # What was checked at the start is what is validated on (and what the checkpoints record).
            check_unchanged(self.val_path, self.val_content, "validation file")
            self.val_batches = fixed_batches(self.val_index, t.batch_size, t.val_batches, self.pad_id,
                                             Share(self.group.rank, self.group.size))
        losses = sample_losses(model, row_losses, progress.work(self.val_batches, "validation"))
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
