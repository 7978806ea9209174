"""Config: defaults of DESIGN.md, YAML with flags over it, validation, fingerprint."""

from __future__ import annotations

import pytest

from config import Config, differing_fields
from errors import UserError
from train_qlora import build_parser, config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_follow_the_design():
    c = parse("--model", "tiny")
    t = c.training
    assert (t.max_steps, t.batch_size, t.grad_accum, t.learning_rate, t.warmup_steps, t.max_seq_length) == \
        (2000, 8, 1, 1e-4, 50, 1024)
    assert (c.lora.rank, c.lora.alpha, c.lora.layers, c.lora.dropout) == (16, 32.0, 16, 0.0)
    assert (c.distrust.alpha, c.distrust.lambda_weight, c.distrust.mode) == (2.7, 1.0, "weighted")
    assert (t.checkpoint_interval, t.keep_checkpoints, t.eval_steps, t.val_batches) == (250, 3, 250, 50)
    es = c.early_stopping
    assert (es.patience, es.min_delta, es.grad_spike_threshold, es.grad_spike_patience) == (5, 0.01, 1000.0, 3)
    assert str(c.output_dir) == "models/distrust-tiny"


def test_yaml_nested_or_flat_and_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nlora:\n  rank: 8\nlearning_rate: 2e-4\nmax_steps: 10\n")
    c = parse("--config", str(path))
    assert (c.lora.rank, c.training.learning_rate, c.training.max_steps) == (8, 2e-4, 10)
    c = parse("--config", str(path), "--lora-rank", "4", "--no-tensorboard")
    assert c.lora.rank == 4 and c.paths.tensorboard is False
    assert Config.from_dict(c.to_dict()).to_dict() == c.to_dict()


def test_fingerprint_covers_what_changes_the_result_only():
    base = parse("--model", "tiny")
    assert parse("--model", "tiny", "--max-steps", "5", "--eval-steps", "3").fingerprint() == base.fingerprint()
    changed = parse("--model", "tiny", "--lora-rank", "8", "--seed", "3")
    assert changed.fingerprint() != base.fingerprint()
    diffs = differing_fields(base.fingerprint_fields(), changed.fingerprint_fields())
    assert any(d.startswith("lora.rank") for d in diffs) and any(d.startswith("seed") for d in diffs)


def test_missing_model_is_an_error():
    with pytest.raises(UserError, match="--model is required"):
        parse("--max-steps", "3")


def test_a_flag_overrides_one_setting_of_a_yaml_section_not_the_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model: tiny\n  quantize_bits: 0\n"
                    "early_stopping:\n  grad_spike_threshold: 5\n")
    c = parse("--config", str(path), "--model", "other", "--no-early-stopping")
    assert c.model.model == "other" and c.model.quantize_bits == 0
    assert c.early_stopping.enabled is False and c.early_stopping.grad_spike_threshold == 5.0
