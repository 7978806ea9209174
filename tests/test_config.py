"""Config: the defaults, YAML (ours and mlx_lm lora's) with flags over it, validation, fingerprint."""

from __future__ import annotations

import pytest

from config import Config, differing_fields
from run_safety.errors import UserError
from conftest import REPO
from train_qlora import build_parser, config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_the_defaults():
    c = parse("--model", "tiny")
    t = c.training
    assert (t.max_steps, t.batch_size, t.grad_accum, t.learning_rate, t.warmup(), t.max_seq_length) == \
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


def test_yaml_takes_every_flag_name_switches_included(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nno_tensorboard: true\nno_early_stopping: true\nno_streaming: true\n"
                    "grad_checkpoint: true\nsgd_nesterov: true\noptimizer: sgd\nsgd_momentum: 0.9\n"
                    "fine_tune_type: dora\nearly_stopping_window: 20\ninit_adapters: some/run\n")
    c = parse("--config", str(path))
    assert (c.paths.tensorboard, c.early_stopping.enabled, c.paths.streaming) == (False, False, False)
    assert (c.training.grad_checkpoint, c.training.optimizer, c.training.sgd_momentum, c.training.sgd_nesterov) == \
        (True, "sgd", 0.9, True)
    assert (c.lora.fine_tune_type, c.early_stopping.window, c.paths.init_adapters) == ("dora", 20, "some/run")
    path.write_text("model: tiny\nno_tensorboard: false\n")
    assert parse("--config", str(path)).paths.tensorboard is True
    # Every flag and switch of the command line has its YAML name (the shipped example lists them all).
    import yaml

    from train_qlora import FLAGS, SWITCHES

    example = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
    for flag, _, _, _ in FLAGS + SWITCHES:
        assert flag[2:].replace("-", "_") in example or flag in ("--output-dir", "--init-adapters"), flag
    assert parse("--config", str(REPO / "examples" / "run.yaml")).to_dict() == parse("--model", "tiny").to_dict()


MLX_LM_YAML = """
model: tiny
train: true
fine_tune_type: dora
optimizer: adam
optimizer_config:
  adam:
    betas: [0.8, 0.95]
    eps: 1e-6
  sgd:
    dampening: 0.5         # another optimizer's section: not read, as by mlx_lm
data: some/data
seed: 3
num_layers: 2
batch_size: 4
iters: 12
val_batches: 3
learning_rate: 3e-3
steps_per_report: 10
steps_per_eval: 5
resume_adapter_file: null
adapter_path: some/adapters
save_every: 4
test: false
test_batches: 100
max_seq_length: 48
grad_checkpoint: true
grad_accumulation_steps: 2
mask_prompt: true
report_to: null
lr_schedule: null
lora_parameters:
  rank: 4
  scale: 2.5
  dropout: 0.0
"""


def test_an_mlx_lm_lora_yaml_maps_the_keys_both_have(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(MLX_LM_YAML)
    c = parse("--config", str(path))
    t = c.training
    assert (c.model.model, c.paths.data_dir, c.paths.output_dir) == ("tiny", "some/data", "some/adapters")
    assert (t.seed, t.batch_size, t.max_steps, t.val_batches, t.learning_rate) == (3, 4, 12, 3, 3e-3)
    assert (t.eval_steps, t.checkpoint_interval, t.max_seq_length, t.grad_checkpoint, t.grad_accum) == \
        (5, 4, 48, True, 2)
    assert (t.optimizer, t.adam_beta1, t.adam_beta2, t.adam_eps) == ("adam", 0.8, 0.95, 1e-6)
    assert (c.lora.fine_tune_type, c.lora.layers, c.lora.rank, c.lora.alpha, c.lora.dropout) == \
        ("dora", 2, 4, 10.0, 0.0)  # alpha = scale x rank
    # The flags are the same run; a flag still overrides one setting (scale kept: alpha follows the rank).
    assert c.fingerprint() == parse("--model", "tiny", "--fine-tune-type", "dora", "--optimizer", "adam",
                                    "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6",
                                    "--seed", "3", "--batch-size", "4", "--max-seq-length", "48",
                                    "--grad-accum", "2", "--learning-rate", "3e-3", "--lora-layers", "2",
                                    "--lora-rank", "4", "--lora-alpha", "10").fingerprint()
    c = parse("--config", str(path), "--lora-rank", "8", "--max-steps", "99")
    assert (c.lora.rank, c.lora.alpha, c.training.max_steps) == (8, 20.0, 99)


@pytest.mark.parametrize("text, fragments", [
    ("model: tiny\nlr_schedule:\n  name: cosine_decay\n", ["lr_schedule", "linear warmup"]),
    ("model: tiny\ntest: true\n", ["test: true", "src/evaluate.py"]),
    ("model: tiny\nfine_tune_type: full\n", ["fine_tune_type: full"]),
    ("model: tiny\noptimizer: adamw\noptimizer_config:\n  adamw:\n    bias_correction: true\n",
     ["optimizer_config.adamw.bias_correction"]),
    ("model: tiny\nreport_to: wandb,swanlab\nval_batches: -1\n", ["report_to: wandb,swanlab", "val_batches: -1"]),
])
def test_an_mlx_lm_key_that_is_not_supported_is_named(tmp_path, text, fragments):
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        parse("--config", str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}: not supported here")
    for fragment in fragments:
        assert fragment in message, message


def test_mask_prompt_false_is_said_not_followed(tmp_path):
    from train_qlora import settings_from_args

    path = tmp_path / "lora.yaml"
    path.write_text("model: tiny\nmask_prompt: false\n")
    _, settings = settings_from_args(build_parser().parse_args(["--config", str(path)]))
    assert len(settings.notes) == 1 and "mask_prompt: false is not followed" in settings.notes[0]


def test_new_options_change_the_fingerprint_with_defaults_that_keep_old_checkpoints():
    base = parse("--model", "tiny")
    saved = base.to_dict()
    for section, names in (("training", ("optimizer", "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum",
                                         "sgd_nesterov", "grad_checkpoint")),
                           ("lora", ("fine_tune_type",)), ("early_stopping", ("window",)), ("paths", ("init_adapters",))):
        for name in names:
            del saved[section][name]  # a checkpoint's config from before these settings
    assert Config.from_dict(saved).fingerprint() == base.fingerprint()
    for flags in (["--optimizer", "adam"], ["--fine-tune-type", "dora"], ["--adam-beta2", "0.98"],
                  ["--optimizer", "sgd", "--sgd-momentum", "0.5"]):
        assert parse("--model", "tiny", *flags).fingerprint() != base.fingerprint(), flags
    # Memory and the plateau window are not what is learned: a resume may change them.
    for flags in (["--grad-checkpoint"], ["--early-stopping-window", "10"]):
        assert parse("--model", "tiny", *flags).fingerprint() == base.fingerprint(), flags


def test_the_val_file_is_val_jsonl_else_mlx_lms_valid_jsonl(tmp_path):
    c = parse("--model", "tiny", "--data-dir", str(tmp_path))
    assert c.val_file == tmp_path / "val.jsonl"
    (tmp_path / "valid.jsonl").write_text("{}\n")
    assert c.val_file == tmp_path / "valid.jsonl"
    (tmp_path / "val.jsonl").write_text("{}\n")
    assert c.val_file == tmp_path / "val.jsonl"


def test_help_gives_every_default_and_the_exit_codes():
    text = build_parser().format_help()
    flat = " ".join(text.split("options:", 1)[1].split())
    for fragment in ("--max-steps MAX_STEPS optimizer steps (default: 2000)", "(default: 0.0001)",
                     "--optimizer OPTIMIZER adamw, adam, sgd or adafactor", "(default: adamw)",
                     "--grad-checkpoint recompute", "(default: off)", "--no-tensorboard write no TensorBoard logs "
                     "(default: they go to OUTPUT/logs)", "exit codes:", "130 after Ctrl+C, 143 after SIGTERM, "
                     "129 after SIGHUP"):
        assert fragment in flat, fragment
    from train_qlora import FLAGS

    for flag, name, _, _ in FLAGS:
        if name not in ("model", "output_dir", "init_adapters"):
            help_line = flat.split(flag + " ", 1)[1].split(" --", 1)[0]
            assert "(default: " in help_line, flag
