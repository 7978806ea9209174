"""The run configuration: dataclasses, validation, YAML, fingerprint.

One `Config` holds a section per part of the toolkit. The command line, a YAML
file (`--config run.yaml`) and a checkpoint all go through `Config.from_dict`,
so a value is checked in one place whatever its source.

A settings file (`--config run.yaml`, read by command_line/settings_file.py)
holds the nested sections (`lora: {rank: 8}`), the flat names of the command
line with underscores (`lora_rank: 8`), or the keys of an `mlx_lm lora` config
that mean the same thing here; flags override the file.
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

from corpus.records import short_repr
from run_safety.errors import UserError


@dataclass
class ModelConfig:
    model: str = ""
    quantize_bits: int = 4
    trust_remote_code: bool = False
    # How the frozen quantized layers of the base compute (base_model/float_base.py): "auto" (float32 copies
    # of their dequantized weights where the backend is the CPU and the copy fits), "on", "off".
    float_base: str = "auto"


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    layers: int = 16
    dropout: float = 0.0
    fine_tune_type: str = "lora"  # or "dora" (weight-decomposed LoRA, mlx-lm's DoRALinear)
    # The linear layers of a block that get LoRA, named as mlx-lm names them ("self_attn.q_proj",
    # "mlp.down_proj"): mlx-lm's lora_parameters.keys. Empty: every linear layer of the block.
    keys: list = field(default_factory=list)


@dataclass
class TrainingConfig:
    max_steps: int = 2000
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    # Linear warmup steps before the cosine decay; AUTO_WARMUP (-1): fitted to the run (warmup()).
    warmup_steps: int = -1
    max_seq_length: int = 1024
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    # The optimizer (mlx.optimizers) and its settings; the learning rate is the schedule's.
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    sgd_nesterov: bool = False
    # Recompute each block's activations in the backward pass (mlx-lm's grad_checkpoint):
    # less memory, more time; what is learned is the same within float rounding.
    grad_checkpoint: bool = False
    # The output layer and the cross-entropy over chunks of this many tokens, so that the
    # whole batch's logits never exist at once (chunked_loss.py): -1 automatic (about 4M
    # logits a chunk), 0 off. Like grad_checkpoint: the same result within float rounding.
    loss_chunk_size: int = -1
    # Before step 1, one forward and backward pass on the longest batch: its peak memory,
    # and a refusal (exit 2, with settings measured to fit) when it cannot fit (memory_check.py).
    memory_check: bool = True
    seed: int = 0
    checkpoint_interval: int = 250
    keep_checkpoints: int = 3
    eval_steps: int = 250
    val_batches: int = 50
    # Passes over the training data; above 0 it sets max_steps from the corpus and the global
    # batch (batch_size x grad_accum) once the corpus is indexed (command_line/start_lines.steps_for_epochs).
    epochs: int = 0
    def warmup(self) -> int:
        """The warmup steps of this run: as given, or fitted to the run's length (AUTO_WARMUP):
        5% of its steps, at most 50, and none when that is under 2 (the warmup starts at rate 0: a
        one-step warmup is a step spent at rate 0). A fixed 50 (the default before) never reached the
        peak rate in a run of 50 steps or fewer, and spent a fifth of a 250-step one climbing to it;
        mlx_lm lora has no warmup unless asked: so none under 40 steps here, and 50 from 1,000 on."""
        if self.warmup_steps != AUTO_WARMUP:
            return self.warmup_steps
        fitted = min(AUTO_WARMUP_MAX, self.max_steps * AUTO_WARMUP_PERCENT // 100)
        return fitted if fitted >= 2 else 0

    # Which assistant turns of a chat record are learned: "all" (every one; system, user and tool
    # turns are context), or "last" (only the final answer, as mlx_lm lora with mask_prompt).
    learn_assistant_turns: str = "all"
    # The data folder's probes.jsonl: scored at every validation ("every 1"), every Nth one
    # ("every N"; and the run's last), or never ("off"). A measurement: not in the fingerprint.
    probes: str = "every 1"


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
    window: int = 50  # the plateau check compares the mean training objective over this many steps


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = ""  # empty: models/distrust-<model name>
    streaming: bool = True
    tensorboard: bool = True
    init_adapters: str = ""  # start a new run from these adapters (a run folder, or an adapters.safetensors)
    report_to: str = ""  # "wandb": the metrics of metrics.jsonl to Weights & Biases too (monitoring/wandb_log.py)
    project_name: str = ""  # the W&B project (mlx-lm's project_name); empty: W&B's default


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
    def from_dict(cls, values: dict, source: str = "config", names: dict | None = None) -> "Config":
        """Build and validate a Config from nested sections and/or flat names.

        `names` maps (section, field) to (where, what the user wrote there), e.g.
        ("lora.yaml", "'iters'") or ("command line", "--max-steps"), so that an error
        names the setting in the user's own words; without it, `source` and our names."""
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
                    _set_field(config, key, name, item, source, names)
            elif key in FLAT_NAMES:
                section, name = FLAT_NAMES[key]
                _set_field(config, section, name, value, source, names)
            else:
                raise UserError(f"{source}: unknown setting '{key}'{did_you_mean(key, FLAT_NAMES)}")
        config.validate(source, names)
        return config

    @classmethod
    def from_saved(cls, values: dict, source: str) -> "Config":
        """The Config of a checkpoint: a setting it does not hold takes the value that
        runs had before the setting existed (OLD_DEFAULTS), not today's default."""
        if isinstance(values, dict):
            values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
            for (section, name), old in OLD_DEFAULTS.items():
                if isinstance(values.get(section), dict) and name not in values[section]:
                    values[section][name] = old
        return cls.from_dict(values, source)

    @staticmethod
    def read_yaml(path: str | Path) -> dict:
        """The YAML file as it is: a mapping (empty for an empty file)."""
        from run_safety.input_files import open_input_file

        path = Path(path)
        try:
            with open_input_file(path, "config file", "r") as handle:  # a FIFO would block
                text = handle.read()
        except OSError as exc:
            raise UserError(f"{path}: cannot read config file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}): a YAML config file "
                            f"is UTF-8") from None
        try:
            values = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except DuplicateKey as exc:
            raise UserError(f"{path}:{exc.line}: {exc.key!r} is given twice (lines {exc.first} and {exc.line}): "
                            f"keep one") from None
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
    def validate(self, source: str = "config", names: dict | None = None) -> None:
        def bad(flag: str, problem: str) -> UserError:
            where, name = setting_name(FLAT_NAMES.get(flag.replace("-", "_")), names, (source, f"--{flag}"))
            return UserError(f"{where}: {name} {problem}")

        if not self.model.model:
            raise bad("model", "is required (an HF id, a local mlx-lm model dir, a GGUF file, or 'tiny')")
        if self.model.quantize_bits not in (0, 2, 3, 4, 5, 6, 8):
            raise bad("quantize-bits", f"must be one of 0, 2, 3, 4, 5, 6, 8 (got {self.model.quantize_bits})")
        if self.model.float_base not in FLOAT_BASE_CHOICES:
            raise bad("float-base", f"must be one of {', '.join(FLOAT_BASE_CHOICES)} (got {self.model.float_base!r})")
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
                whole = " (mlx_lm lora's -1, the whole file, is not taken: give a number of batches)" \
                    if flag == "val-batches" and value == -1 else ""
                raise bad(flag, f"must be at least 1 (got {value}){whole}")
        if t.max_seq_length < 2:  # one input and one target at the least
            raise bad("max-seq-length", f"must be at least 2 (got {t.max_seq_length})")
        if t.loss_chunk_size < -1:
            raise bad("loss-chunk-size", f"must be -1 (automatic), 0 (off) or a number of tokens (got {t.loss_chunk_size})")
        if t.warmup_steps < AUTO_WARMUP:
            raise bad("warmup-steps", f"must be 0 or more, or -1 (fitted to the run) (got {t.warmup_steps})")
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
        if lo.fine_tune_type not in FINE_TUNE_TYPES:
            raise bad("fine-tune-type", f"must be one of {', '.join(FINE_TUNE_TYPES)} (got {lo.fine_tune_type!r})")
        if t.grad_checkpoint and lo.dropout > 0:
            # mx.checkpoint recomputes a block in the backward pass, drawing new dropout masks:
            # the gradient would not be that of the loss computed (mlx_lm lora allows it).
            raise bad("grad-checkpoint", f"cannot go with --lora-dropout above 0 (got {lo.dropout}): the "
                                         f"recomputed pass would draw other dropout masks than the forward pass, "
                                         f"and the gradient would not be the loss's; choose one")
        if es.window < 1:
            raise bad("early-stopping-window", f"must be at least 1 (got {es.window})")
        if t.epochs < 0:
            raise bad("epochs", f"must be 0 (--max-steps decides) or more (got {t.epochs})")
        if t.learn_assistant_turns not in LEARNED_TURNS:
            raise bad("learn-assistant-turns", f"must be one of {', '.join(LEARNED_TURNS)} "
                                               f"(got {t.learn_assistant_turns!r})")
        if probe_interval(t.probes) is None:
            raise bad("probes", f"must be 'off' or 'every N' with N at least 1 (got {t.probes!r})")
        if self.paths.report_to not in REPORT_TO:
            raise bad("report-to", f"must be wandb, or empty for none (got {self.paths.report_to!r}; "
                                   f"metrics.jsonl and TensorBoard are always written)")
        self._validate_optimizer(bad)

    def _validate_optimizer(self, bad) -> None:
        t = self.training
        if t.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)} (got {t.optimizer!r})")
        for flag, value in (("adam-beta1", t.adam_beta1), ("adam-beta2", t.adam_beta2)):
            if not (math.isfinite(value) and 0 <= value < 1):
                raise bad(flag, f"must be in [0, 1) (got {value})")
        if not (math.isfinite(t.adam_eps) and t.adam_eps > 0):
            raise bad("adam-eps", f"must be a positive number (got {t.adam_eps})")
        if not (math.isfinite(t.sgd_momentum) and 0 <= t.sgd_momentum < 1):
            raise bad("sgd-momentum", f"must be in [0, 1) (got {t.sgd_momentum})")
        if t.sgd_nesterov and t.sgd_momentum == 0:
            raise bad("sgd-nesterov", "needs --sgd-momentum above 0")
        # A setting of another optimizer than the one chosen is a mistake, not a no-op to keep quiet about.
        defaults = TrainingConfig()
        for flag, name, used_by in OPTIMIZER_SETTINGS:
            if t.optimizer not in used_by and getattr(t, name) != getattr(defaults, name):
                raise bad(flag, f"applies to --optimizer {' or '.join(used_by)}, not {t.optimizer}")

    # -- derived values ---------------------------------------------------
    @property
    def output_dir(self) -> Path:
        if self.paths.output_dir:
            return Path(self.paths.output_dir)
        name = Path(self.model.model.rstrip("/")).name or "model"
        name = name[:-len(".gguf")] if name.lower().endswith(".gguf") else name  # a GGUF file: its stem
        return Path("models") / f"distrust-{name}"

    @property
    def train_file(self) -> Path:
        return Path(self.paths.data_dir) / "train.jsonl"

    @property
    def val_file(self) -> Path:
        """val.jsonl, else mlx-lm's name valid.jsonl (val.jsonl when neither exists)."""
        data = Path(self.paths.data_dir)
        for name in VAL_FILES:
            if (data / name).is_file():
                return data / name
        return data / VAL_FILES[0]

    def fingerprint_fields(self) -> dict:
        """The fields that change what is learned; a resume must match them.

        They are the model, the LoRA shape (DoRA or LoRA included), batch,
        sequence length, seed and objective, and the optimizer with its
        settings (which optimizer, learning rate, warmup, clipping, weight
        decay, betas, momentum), which change the result just as much. Max
        steps, intervals, patience, paths, --grad-checkpoint and
        --loss-chunk-size (memory, not what is learned: the same result within
        float rounding), --float-base (how the quantized base computes: float32 copies of its layers
        or the quantized kernels, the same function up to rounding; a checkpoint records which, and a
        resume that computes the other way says it is not bit for bit) and --no-memory-check are not:
        they may change. What the data, the model and
        the starting adapters *are* (not what they are called) is compared
        beside these, from the run's inputs (see train_qlora.run_inputs).
        New fields get the default that old runs had, so their checkpoints
        still resume.
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
            "optimizer": {name: getattr(t, name) for name in ("optimizer", "adam_beta1", "adam_beta2", "adam_eps",
                                                              "sgd_momentum", "sgd_nesterov")},
            "distrust": dataclasses.asdict(self.distrust),
            "learn_assistant_turns": t.learn_assistant_turns,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the
    last silently, and the user meant one of the two."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor names it
                continue
            if first != key_node.start_mark.line + 1:
                raise DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


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


AUTO_WARMUP, AUTO_WARMUP_PERCENT, AUTO_WARMUP_MAX = -1, 5, 50  # TrainingConfig.warmup()
SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}
VAL_FILES = ("val.jsonl", "valid.jsonl")  # the validation file: ours, else mlx-lm's name
FINE_TUNE_TYPES = ("lora", "dora")
LEARNED_TURNS = ("all", "last")  # TrainingConfig.learn_assistant_turns
FLOAT_BASE_CHOICES = ("auto", "on", "off")  # ModelConfig.float_base
REPORT_TO = ("", "wandb")  # PathsConfig.report_to
# Settings whose default changed: a checkpoint written before they existed ran with the old value
# (Config.from_saved). Before learn_assistant_turns, only the last answer of a chat was learned.
OLD_DEFAULTS = {("training", "learn_assistant_turns"): "last"}
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
# (flag, field, the optimizers it applies to); weight decay: every one but adam, which has none.
OPTIMIZER_SETTINGS = (
    ("adam-beta1", "adam_beta1", ("adamw", "adam")),
    ("adam-beta2", "adam_beta2", ("adamw", "adam")),
    ("adam-eps", "adam_eps", ("adamw", "adam")),
    ("sgd-momentum", "sgd_momentum", ("sgd",)),
    ("sgd-nesterov", "sgd_nesterov", ("sgd",)),
    ("weight-decay", "weight_decay", ("adamw", "sgd", "adafactor")),
)

# Flat names (the command-line flags with underscores) -> (section, field).
FLAT_NAMES = {
    "model": ("model", "model"),
    "quantize_bits": ("model", "quantize_bits"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "float_base": ("model", "float_base"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "lora_layers": ("lora", "layers"),
    "lora_dropout": ("lora", "dropout"),
    "lora_keys": ("lora", "keys"),
    "fine_tune_type": ("lora", "fine_tune_type"),
    **{f.name: ("training", f.name) for f in dataclasses.fields(TrainingConfig)},
    "alpha": ("distrust", "alpha"),
    "lambda_weight": ("distrust", "lambda_weight"),
    "distrust_mode": ("distrust", "mode"),
    "early_stopping": ("early_stopping", "enabled"),
    "early_stopping_patience": ("early_stopping", "patience"),
    "early_stopping_min_delta": ("early_stopping", "min_delta"),
    "grad_spike_threshold": ("early_stopping", "grad_spike_threshold"),
    "grad_spike_patience": ("early_stopping", "grad_spike_patience"),
    "early_stopping_window": ("early_stopping", "window"),
    "data_dir": ("paths", "data_dir"),
    "output_dir": ("paths", "output_dir"),
    "streaming": ("paths", "streaming"),
    "tensorboard": ("paths", "tensorboard"),
    "init_adapters": ("paths", "init_adapters"),
    "report_to": ("paths", "report_to"),
    "project_name": ("paths", "project_name"),
}


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """" (did you mean 'prefix+close'?)" for the known name `name` is close to, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def setting_name(key: tuple | None, names: dict | None, default: tuple) -> tuple[str, str]:
    """(where, name) of the setting `key` = (section, field) as the user wrote it, else `default`."""
    return (names or {}).get(key, default)


def probe_interval(setting: str) -> int | None:
    """--probes as a number of validations: 0 for "off", N for "every N"; None if it is neither."""
    words = str(setting).split()
    if words == ["off"]:
        return 0
    if len(words) == 2 and words[0] == "every" and words[1].isdigit() and int(words[1]) >= 1:
        return int(words[1])
    return None


# Settings whose values are words among which "on" or "off" stand: YAML 1.1 reads a bare `on`
# or `off` as true or false, which they mean here (`probes: off`, `float_base: on`).
ON_OFF_WORDS = {("training", "probes"), ("model", "float_base")}


def _probes_text(value: Any) -> Any:
    """--probes as written: the command line gives `--probes every 4` as two words; a number
    alone is "every N"."""
    if isinstance(value, list) and all(isinstance(word, str) for word in value):
        return " ".join(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"every {value}"
    return value


def _set_field(config: Config, section: str, name: str, value: Any, source: str, names: dict | None = None) -> None:
    if (section, name) in ON_OFF_WORDS and isinstance(value, bool):
        value = "on" if value else "off"
    if (section, name) == ("training", "probes"):
        value = _probes_text(value)
    part = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(part)}
    if name not in fields:
        raise UserError(f"{source}: unknown setting '{section}.{name}'{did_you_mean(name, fields)}")
    default = getattr(part, name)
    where, shown = setting_name((section, name), names, (source, f"'{section}.{name}'"))
    setattr(part, name, _coerce(value, type(default), shown, where))


KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              list: "a list of names (or one string of names separated by commas)"}


def _coerce(value: Any, kind: type, name: str, source: str) -> Any:
    """Accept a value of the field's type (an int where a float is expected too; for a list
    of names, a list of strings or one comma-separated string, kept sorted and unique)."""
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return sorted({part.strip() for item in items for part in item.split(",") if part.strip()})
    elif kind is bool:
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
    raise UserError(f"{source}: {name} must be {KIND_WORDS.get(kind, kind.__name__)}, got {short_repr(value)}")
