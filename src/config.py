"""The run configuration: dataclasses, validation, YAML, fingerprint.

One `Config` holds a section per part of the toolkit. The command line, a YAML
file (`--config run.yaml`) and a checkpoint all go through `Config.from_dict`,
so a value is checked in one place whatever its source.

YAML accepts either the nested sections (`lora: {rank: 8}`) or the flat names
of the command line with underscores (`lora_rank: 8`); flags override the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import UserError


@dataclass
class ModelConfig:
    model: str = ""
    quantize_bits: int = 4
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    layers: int = 16
    dropout: float = 0.0


@dataclass
class TrainingConfig:
    max_steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    max_seq_length: int = 1024
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_interval: int = 250
    keep_checkpoints: int = 3
    eval_steps: int = 250
    val_batches: int = 50


@dataclass
class DistrustConfig:
    alpha: float = 2.7
    lambda_weight: float = 1.0
    mode: str = "weighted"


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 5
    min_delta: float = 0.01
    grad_spike_threshold: float = 1000.0
    grad_spike_patience: int = 3


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = ""  # empty: models/distrust-<model name>
    streaming: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distrust: DistrustConfig = field(default_factory=DistrustConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    # -- conversion -------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        """Build and validate a Config from nested sections and/or flat names."""
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        config = cls()
        for key, value in values.items():
            # `model` and `early_stopping` are both a section and a flat name:
            # a mapping is the section, anything else the flat setting.
            if key in SECTION_TYPES and (isinstance(value, dict) or key not in FLAT_NAMES):
                if not isinstance(value, dict):
                    raise UserError(f"{source}: '{key}' must be a mapping of settings")
                for name, item in value.items():
                    _set_field(config, key, name, item, source)
            elif key in FLAT_NAMES:
                section, name = FLAT_NAMES[key]
                _set_field(config, section, name, value, source)
            else:
                raise UserError(f"{source}: unknown setting '{key}'")
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict:
        """Read a YAML file into a plain dict (validated later, with the flags)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read config file ({exc.strerror})") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f"{path}:{line + 1}" if line is not None else str(path)
            raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of settings at the top level")
        return values

    # -- validation -------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(flag: str, problem: str) -> UserError:
            return UserError(f"{source}: --{flag} {problem}")

        if not self.model.model:
            raise bad("model", "is required (an HF id, a local mlx-lm model dir, or 'tiny')")
        if self.model.quantize_bits not in (0, 2, 3, 4, 5, 6, 8):
            raise bad("quantize-bits", f"must be one of 0, 2, 3, 4, 5, 6, 8 (got {self.model.quantize_bits})")
        t, lo, d, es = self.training, self.lora, self.distrust, self.early_stopping
        positive_ints = {
            "max-steps": t.max_steps, "batch-size": t.batch_size, "grad-accum": t.grad_accum,
            "checkpoint-interval": t.checkpoint_interval,
            "keep-checkpoints": t.keep_checkpoints, "eval-steps": t.eval_steps,
            "val-batches": t.val_batches, "lora-rank": lo.rank,
            "early-stopping-patience": es.patience, "grad-spike-patience": es.grad_spike_patience,
        }
        for flag, value in positive_ints.items():
            if value < 1:
                raise bad(flag, f"must be at least 1 (got {value})")
        if t.max_seq_length < 2:  # one input and one target at the least
            raise bad("max-seq-length", f"must be at least 2 (got {t.max_seq_length})")
        if t.warmup_steps < 0:
            raise bad("warmup-steps", f"must be 0 or more (got {t.warmup_steps})")
        if not 0 <= t.seed < 2**32:
            raise bad("seed", f"must be in [0, 2**32) (got {t.seed})")
        if lo.layers == 0 or lo.layers < -1:
            raise bad("lora-layers", f"must be -1 (all) or at least 1 (got {lo.layers})")
        positive_floats = {
            "learning-rate": t.learning_rate, "lora-alpha": lo.alpha, "max-grad-norm": t.max_grad_norm,
            "grad-spike-threshold": es.grad_spike_threshold,
        }
        for flag, value in positive_floats.items():
            if not (math.isfinite(value) and value > 0):
                raise bad(flag, f"must be a positive number (got {value})")
        nonnegative_floats = {
            "weight-decay": t.weight_decay, "alpha": d.alpha, "lambda-weight": d.lambda_weight,
            "early-stopping-min-delta": es.min_delta,
        }
        for flag, value in nonnegative_floats.items():
            if not (math.isfinite(value) and value >= 0):
                raise bad(flag, f"must be a number of 0 or more (got {value})")
        if not 0.0 <= lo.dropout < 1.0:
            raise bad("lora-dropout", f"must be in [0, 1) (got {lo.dropout})")
        if d.mode not in ("weighted", "reference"):
            raise bad("distrust-mode", f"must be 'weighted' or 'reference' (got {d.mode!r})")

    # -- derived values ---------------------------------------------------
    @property
    def output_dir(self) -> Path:
        if self.paths.output_dir:
            return Path(self.paths.output_dir)
        name = Path(self.model.model.rstrip("/")).name or "model"
        return Path("models") / f"distrust-{name}"

    @property
    def train_file(self) -> Path:
        return Path(self.paths.data_dir) / "train.jsonl"

    @property
    def val_file(self) -> Path:
        return Path(self.paths.data_dir) / "val.jsonl"

    def fingerprint_fields(self) -> dict:
        """The fields that change what is learned; a resume must match them.

        DESIGN.md names model, data, LoRA shape, batch, sequence length, seed
        and objective. The optimizer settings (learning rate, warmup, clipping,
        weight decay) change the result just as much, so they are in too.
        Max steps, intervals, patience and paths are not: they may change.
        What the data and model *are* (not what they are called) is compared
        beside these, from the run's inputs (see train_qlora.run_inputs).
        """
        t = self.training
        return {
            "model": self.model.model,
            "quantize_bits": self.model.quantize_bits,
            "lora": dataclasses.asdict(self.lora),
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "max_seq_length": t.max_seq_length,
            "seed": t.seed,
            "learning_rate": t.learning_rate,
            "warmup_steps": t.warmup_steps,
            "max_grad_norm": t.max_grad_norm,
            "weight_decay": t.weight_decay,
            "distrust": dataclasses.asdict(self.distrust),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def differing_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Names of the fingerprint fields whose values differ, with both values."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}

# Flat names (the command-line flags with underscores) -> (section, field).
FLAT_NAMES = {
    "model": ("model", "model"),
    "quantize_bits": ("model", "quantize_bits"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "lora_layers": ("lora", "layers"),
    "lora_dropout": ("lora", "dropout"),
    **{f.name: ("training", f.name) for f in dataclasses.fields(TrainingConfig)},
    "alpha": ("distrust", "alpha"),
    "lambda_weight": ("distrust", "lambda_weight"),
    "distrust_mode": ("distrust", "mode"),
    "early_stopping": ("early_stopping", "enabled"),
    "early_stopping_patience": ("early_stopping", "patience"),
    "early_stopping_min_delta": ("early_stopping", "min_delta"),
    "grad_spike_threshold": ("early_stopping", "grad_spike_threshold"),
    "grad_spike_patience": ("early_stopping", "grad_spike_patience"),
    "data_dir": ("paths", "data_dir"),
    "output_dir": ("paths", "output_dir"),
    "streaming": ("paths", "streaming"),
    "tensorboard": ("paths", "tensorboard"),
}


def _set_field(config: Config, section: str, name: str, value: Any, source: str) -> None:
    part = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(part)}
    if name not in fields:
        raise UserError(f"{source}: unknown setting '{section}.{name}'")
    default = getattr(part, name)
    setattr(part, name, _coerce(value, type(default), f"{section}.{name}", source))


def _coerce(value: Any, kind: type, name: str, source: str) -> Any:
    """Accept a value of the field's type (an int where a float is expected too)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{source}: '{name}' must be {kind.__name__}, got {value!r}")
