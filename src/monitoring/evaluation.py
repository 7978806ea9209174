"""The loss of a model on fixed batches, overall and by group.

One evaluation serves the trainer's validation and `evaluate.py` (base model
against adapted model): the loss per sample is computed once, by a compiled
forward in eval mode, then grouped by authority (primary: auth_weight below
AUTHORITY_SPLIT; consensus: at or above it) and by `source_type`. Every loss
is plain cross-entropy per real target token, so runs trained with any
`--lambda-weight` compare. The headline figure is the gap: primary loss minus
consensus loss; the distrust objective is meant to push it down.

General text (`evaluate.py --general`, DATA/general.jsonl) is measured the same way,
as one group: plain text of neither kind, whose loss says what the training cost
on text it was not about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from training.chunked_loss import WHOLE_PLAN, LossPlan, token_losses
from corpus.index import CorpusIndex
from training.distrust import AUTHORITY_SPLIT

GENERAL_FILE = "general.jsonl"  # in a data folder: general text, which evaluate.py measures by default


def compile_row_losses(model: nn.Module, plan: LossPlan = WHOLE_PLAN):
    """(inputs, targets, mask) -> summed cross-entropy per row; compiled, the model's state an input.
    With a chunked `plan` the logits are computed a chunk of tokens at a time (chunked_loss.py)."""

    @partial(mx.compile, inputs=[model.state])
    def row_losses(inputs, targets, mask):
        return (token_losses(model, inputs, targets, plan) * mask).sum(axis=1)

    return row_losses


@dataclass
class SampleLosses:
    ce: np.ndarray  # float32, summed cross-entropy over each sample's real target tokens
    tokens: np.ndarray  # float32, real target tokens of each sample
    positions: np.ndarray  # int64, each sample's position in the index


def sample_losses(model: nn.Module, row_losses, batches) -> SampleLosses:
    """Run the batches through `row_losses` in eval mode (no dropout); fill rows are dropped."""
    was_training = model.training
    model.eval()
    ce, tokens, positions = [], [], []
    try:
        for batch in batches:
            row_sums = row_losses(mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
            mx.eval(row_sums)
            real = batch.real_rows
            ce.append(np.array(row_sums)[real])
            tokens.append(batch.mask.sum(axis=1)[real])
            positions.append(batch.indices[real])
    finally:
        model.train(was_training)
    return SampleLosses(np.concatenate(ce), np.concatenate(tokens), np.concatenate(positions))


def overall_loss(model: nn.Module, row_losses, batches) -> dict:
    """The loss of every sample of `batches` as one group (group_loss): general text."""
    losses = sample_losses(model, row_losses, batches)
    return group_loss(losses.ce, losses.tokens)


def file_in(data_dir: Path, name: str) -> Path | None:
    """DIR/name if there is something at that name (probes.jsonl, general.jsonl: measured when
    there); what is not a readable file is refused when it is read."""
    path = Path(data_dir) / name
    return path if path.exists() or path.is_symlink() else None


def group_loss(ce: np.ndarray, tokens: np.ndarray) -> dict:
    """Loss per token, its perplexity, and what it was taken over."""
    total = float(tokens.sum())
    loss = float(ce.astype(np.float64).sum() / total) if total > 0 else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "samples": int(len(ce)), "tokens": int(total)}


def loss_report(losses: SampleLosses, index: CorpusIndex) -> dict:
    """{"overall", "primary", "consensus", "gap", "by_source_type"}: a group is absent when it has no sample."""
    auth = index.auth_weight[losses.positions]
    report = {"overall": group_loss(losses.ce, losses.tokens)}
    for name, rows in (("primary", auth < AUTHORITY_SPLIT), ("consensus", auth >= AUTHORITY_SPLIT)):
        if rows.any():
            report[name] = group_loss(losses.ce[rows], losses.tokens[rows])
    report["gap"] = (report["primary"]["loss"] - report["consensus"]["loss"]
                     if "primary" in report and "consensus" in report else None)
    codes = index.source_type[losses.positions]
    report["by_source_type"] = {name: group_loss(losses.ce[codes == code], losses.tokens[codes == code])
                                for code, name in sorted(enumerate(index.source_type_names), key=lambda cn: cn[1])
                                if (codes == code).any()}
    return report
