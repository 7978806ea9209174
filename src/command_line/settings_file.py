"""Settings files: ours, with every flag name, or an `mlx_lm lora` config.

YAML accepts the nested sections of config.py (`lora: {rank: 8}`), the flat
names of the command line with underscores (`lora_rank: 8`, switches too:
`no_tensorboard: true`), and the keys of an `mlx_lm lora` config that mean the
same thing here (`iters`, `num_layers`, `lora_parameters`, ...: see
MLX_LM_KEYS). Every key this toolkit does not know or support is named in one
error, with the key it was close to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from config import FLAT_NAMES, OPTIMIZERS, SECTION_TYPES, Config, TrainingConfig, did_you_mean
from corpus.records import short_repr
from run_safety.errors import UserError

# Switches of the command line that set a setting to the opposite of their name.
NEGATED_SWITCHES = {"no_tensorboard": "tensorboard", "no_early_stopping": "early_stopping",
                    "no_streaming": "streaming", "no_memory_check": "memory_check"}
# Choices of where a run starts (flags, not settings): a file may hold them too.
START_CHOICES = ("auto_resume", "resume", "fresh")

# mlx_lm lora keys -> our flat name, where the meaning is the same.
MLX_LM_KEYS = {
    "iters": "max_steps",
    "num_layers": "lora_layers",
    "steps_per_eval": "eval_steps",
    "save_every": "checkpoint_interval",
    "adapter_path": "output_dir",
    "data": "data_dir",
    "grad_accumulation_steps": "grad_accum",
    "resume_adapter_file": "init_adapters",
}
# mlx_lm lora keys that change nothing here (with any value): accepted and left alone.
MLX_LM_NO_EFFECT = {
    "steps_per_report": "the progress line is updated at every step, metrics.jsonl has every step",
    "test_batches": "used only with test: true",
    "config": "",
}
# mlx_lm lora keys accepted only with the value that does what this toolkit does;
# any other value is named in the error with why.
MLX_LM_ONLY_VALUE = {
    "train": (True, "this command only trains"),
    "test": (False, "evaluate after training with src/evaluate.py (it takes DATA/test.jsonl)"),
    "lr_schedule": (None, "the schedule is a linear warmup (--warmup-steps) then cosine decay to 0"),
    "clear_cache_threshold": (0, "not needed: memory is reported on the progress line"),
    "hf_dataset": (None, "give a local folder with train.jsonl (data:)"),
}
# optimizer_config.<optimizer>.<key> -> our flat name (betas: two of them)
MLX_LM_OPTIMIZER_KEYS = {"eps": "adam_eps", "weight_decay": "weight_decay", "momentum": "sgd_momentum",
                         "nesterov": "sgd_nesterov"}


@dataclass
class SettingsFile:
    """What a settings file holds, split the way the command line needs it."""
    values: dict  # settings for Config.from_dict (nested sections and/or flat names)
    start: dict = field(default_factory=dict)  # auto_resume / resume / fresh
    notes: list = field(default_factory=list)  # said once at the start
    lora_scale: float | None = None  # mlx-lm's lora_parameters.scale: alpha = scale * rank, whatever rank ends up
    names: dict = field(default_factory=dict)  # (section, field) -> (file, the key as written): for errors


def read_settings_file(path: str | Path) -> SettingsFile:
    """A YAML settings file as settings: our names (flags with underscores, switches
    included, or nested sections) and the `mlx_lm lora` keys that mean the same
    here. Every key that is unknown (with the name it was close to, from its own
    section) or not supported is named in one UserError."""
    path = Path(path)
    raw = Config.read_yaml(path)
    result = SettingsFile(values={})
    unknown: list[str] = []  # "'itres' (did you mean 'iters'?)": mistakes
    unsupported: list[str] = []  # mlx_lm lora settings with no equivalent here, each with why

    def take(flat: str, value, written: str) -> None:
        """Our flat setting `flat` from the file's key `written` (for errors in the user's words)."""
        result.values[flat] = value
        result.names[FLAT_NAMES[flat]] = (str(path), f"'{written}'")

    for key, value in raw.items():
        if not isinstance(key, str):
            raise UserError(f"{path}: setting names must be strings, got {key!r}")
        if key in NEGATED_SWITCHES:
            if not isinstance(value, bool):
                raise UserError(f"{path}: '{key}' must be true or false, got {value!r}")
            take(NEGATED_SWITCHES[key], not value, key)
        elif key in START_CHOICES:
            result.start[key] = value
        elif key in MLX_LM_KEYS:
            if value is not None:  # mlx-lm writes null for "not given"
                take(MLX_LM_KEYS[key], value, key)
        elif key in MLX_LM_NO_EFFECT:
            continue
        elif key in MLX_LM_ONLY_VALUE:
            wanted, why = MLX_LM_ONLY_VALUE[key]
            if value != wanted or type(value) is not type(wanted):
                unsupported.append(f"{key}: {_yaml_text(value)} ({why})")
        elif key in MLX_LM_FEATURES:
            if value is not None and value != MLX_LM_FEATURES[key]:
                unsupported.append(f"{key}: {_yaml_text(value)} (records are read by the field "
                                   f"'{MLX_LM_FEATURES[key]}' here: rename the field in the data)")
        elif key in ("report_to", "project_name") and value is None:
            continue  # mlx-lm's "not given"
        elif key == "report_to":
            _report_to(value, take, unsupported)
        elif key == "wandb":  # older mlx-lm configs: the W&B project
            if value is not None:
                take("report_to", "wandb", key)
                take("project_name", value, key)
        elif key == "mask_prompt":
            if value is False:
                result.notes.append(f"{path}: mask_prompt: false is not followed: "
                                    f"{MASK_PROMPT_HERE.format(last='learn_assistant_turns: last')}")
            elif value is not True:
                unsupported.append(f"mask_prompt: {_yaml_text(value)} (true or false)")
        elif key == "lora_parameters":
            _lora_parameters(value, result, take, unknown, path)
        elif key == "optimizer_config":
            pass  # read below, once the optimizer is known
        elif key == "use_dora":  # older mlx-lm configs
            if not isinstance(value, bool):
                raise UserError(f"{path}: 'use_dora' must be true or false, got {value!r}")
            if value and "fine_tune_type" not in result.values:
                take("fine_tune_type", "dora", key)
        elif key == "val_batches" and value == -1:
            unsupported.append("val_batches: -1 (the whole validation file: give a number of batches)")
        elif key == "fine_tune_type" and value == "full":
            unsupported.append("fine_tune_type: full (this toolkit trains LoRA or DoRA adapters on a quantized base)")
        elif key == "optimizer" and value == "muon":
            unsupported.append(f"optimizer: muon (one of {', '.join(OPTIMIZERS)})")
        elif key in SECTION_TYPES and (isinstance(value, dict) or key not in FLAT_NAMES):
            result.values[key] = value  # a section (Config.from_dict checks its values)
            if isinstance(value, dict):
                fields = [f.name for f in dataclasses.fields(SECTION_TYPES[key]())]
                for name in list(value):
                    if name not in fields:
                        unknown.append(unknown_key(f"{key}.{name}", name, fields, f"{key}."))
                        del value[name]
                    else:
                        result.names[(key, name)] = (str(path), f"'{key}.{name}'")
        elif key in FLAT_NAMES:
            take(key, value, key)  # ours
        else:
            unknown.append(unknown_key(key, key, YAML_KEYS))
    if "optimizer_config" in raw:
        chosen = raw.get("optimizer", TrainingConfig.optimizer)
        _optimizer_config(raw["optimizer_config"], chosen, take, unknown, unsupported, path)
    problems = []
    if unknown:
        problems.append(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if unsupported:
        problems.append(f"not supported here (an mlx_lm lora setting with no equivalent): {'; '.join(unsupported)}; "
                        f"remove or change {'it' if len(unsupported) == 1 else 'them'}")
    if problems:
        raise UserError(f"{path}: {'; and '.join(problems)}")
    return result


def unknown_key(written: str, name: str, known, prefix: str = "") -> str:
    """"'written' (did you mean 'prefix+close'?)": a mistyped key, with the one it was close to
    among the `known` names of its own section."""
    return f"'{written}'" + did_you_mean(name, known, prefix)


def _yaml_text(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _report_to(value, take, unsupported: list) -> None:
    """mlx-lm's report_to: "wandb" (mlx-lm also takes "swanlab", and lists: only W&B is supported here)."""
    names = [item.strip().lower() for item in value.split(",") if item.strip()] if isinstance(value, str) else None
    if names is None or any(name != "wandb" for name in names):
        unsupported.append(f"report_to: {_yaml_text(value)} (wandb; metrics.jsonl and TensorBoard are always "
                           f"written)")
    elif names:
        take("report_to", "wandb", "report_to")


def _lora_parameters(value, result: SettingsFile, take, unknown: list, path: Path) -> None:
    if not isinstance(value, dict):
        raise UserError(f"{path}: lora_parameters must be a mapping of rank, scale, dropout, keys")
    for name, item in value.items():
        if name == "keys" and item is None:
            continue  # mlx-lm's "not given": every linear layer
        if name in ("rank", "dropout", "keys"):
            take(f"lora_{name}", item, f"lora_parameters.{name}")
        elif name == "scale":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not (math.isfinite(item) and item > 0):
                raise UserError(f"{path}: 'lora_parameters.scale' must be a positive number, got {short_repr(item)}")
            result.lora_scale = float(item)
        else:  # mlx-lm's lora_parameters has these four and no other
            hint = " (LoRA's alpha is scale x rank: give scale)" if name == "alpha" else ""
            unknown.append(unknown_key(f"lora_parameters.{name}", name, MLX_LM_LORA_PARAMETERS, "lora_parameters.")
                           + hint)


def _optimizer_config(value, chosen, take, unknown: list, unsupported: list, path: Path) -> None:
    """mlx-lm reads only the section of the optimizer it uses: so does this."""
    if not isinstance(value, dict):
        raise UserError(f"{path}: optimizer_config must be a mapping of optimizer name -> settings")
    section = (value.get(chosen) if isinstance(chosen, str) else None) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: optimizer_config.{chosen} must be a mapping of settings")
    for name, item in section.items():
        written = f"optimizer_config.{chosen}.{name}"
        if name == "betas":
            if not (isinstance(item, list) and len(item) == 2):
                raise UserError(f"{path}: '{written}' must be a list of two numbers, got {short_repr(item)}")
            take("adam_beta1", item[0], f"{written}[0]")
            take("adam_beta2", item[1], f"{written}[1]")
        elif name in MLX_LM_OPTIMIZER_KEYS:
            take(MLX_LM_OPTIMIZER_KEYS[name], item, written)
        elif name in MLX_OPTIMIZER_ARGUMENTS.get(chosen, ()):
            unsupported.append(written)  # an argument of mlx's optimizer that this toolkit does not set
        else:
            unknown.append(unknown_key(written, name, MLX_OPTIMIZER_ARGUMENTS.get(chosen, MLX_LM_OPTIMIZER_KEYS),
                                       f"optimizer_config.{chosen}."))


# mlx-lm's lora_parameters, and the arguments of the mlx.optimizers classes that an
# optimizer_config section may hold (those this toolkit does not set are refused as such).
MLX_LM_LORA_PARAMETERS = ("rank", "scale", "dropout", "keys")
MLX_OPTIMIZER_ARGUMENTS = {
    "adamw": ("betas", "eps", "weight_decay", "bias_correction"),
    "adam": ("betas", "eps", "bias_correction"),
    "sgd": ("momentum", "weight_decay", "dampening", "nesterov"),
    "adafactor": ("eps", "clip_threshold", "decay_rate", "beta_1", "weight_decay", "scale_parameter",
                  "relative_step", "warmup_init"),
}
# mlx-lm's names of the record fields it reads (chat_feature: messages, ...): the same names here.
MLX_LM_FEATURES = {"chat_feature": "messages", "text_feature": "text", "prompt_feature": "prompt",
                   "completion_feature": "completion"}
# What mlx-lm's mask_prompt asks is always so here ({last}: how the file or the command line says "only the last").
MASK_PROMPT_HERE = ("system, user and tool turns and prompts are never learned here (chat records learn every "
                    "assistant turn, or the last with {last}; text records are learned whole)")


# Every top-level key a settings file may hold: what a mistyped one is compared with.
YAML_KEYS = sorted({*FLAT_NAMES, *SECTION_TYPES, *NEGATED_SWITCHES, *START_CHOICES, *MLX_LM_KEYS, *MLX_LM_NO_EFFECT,
                    *MLX_LM_ONLY_VALUE, *MLX_LM_FEATURES, "report_to", "project_name", "wandb", "mask_prompt",
                    "lora_parameters", "optimizer_config", "use_dora"} - {"config"})
