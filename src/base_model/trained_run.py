"""A finished (or running) run's checkpoint and the base it was trained on, for export,
generate and evaluate."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten

from run_safety.errors import UserError
from base_model.builds import BASE_RECORD_FILE, BaseModel, local_model_dir, remove_if_changed
from base_model.loading import load_with_mlx_lm, prepare_base, resolve_model
from base_model.weights import names_mismatch, shapes_mismatch


def run_base_model(adapter_config: dict, config) -> BaseModel:
    """The base of a run as it was trained, from the adapter config it saved and its
    Config: the one helper export.py, generate.py and evaluate.py share.

    The run records the base it was given (resolved: an HF id or an absolute
    path) and how it was quantized on load. That base must still be there; its
    quantized copy is rebuilt in this project's cache when it is not (the
    project moved: same base, same bits, same arrays). When the recorded local
    folder is gone and the run used `--model tiny`, the tiny model is rebuilt
    locally, byte for byte.
    """
    record = adapter_config.get("base_model") if isinstance(adapter_config.get("base_model"), dict) else {}
    # Runs from before the record named the base itself in "model".
    recorded = record.get("source") or adapter_config.get("model") or config.model.model
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        if config.model.model == "tiny":
            recorded = resolve_model("tiny")  # rebuilt locally, byte for byte
        else:
            raise UserError(f"base model {recorded} not found (the run was trained on it; restore it or move the run "
                            f"to a machine that has it)")
    # The quantized copy the run names, still here, is exactly what it trained
    # on, even where the base's files were touched since (which changes the key).
    named, quantization = adapter_config.get("model"), record.get("quantized_on_load")
    # A copy edited in the cache since it was written is not that: it is built again from its source
    # (whose own identity open_run then checks), as a training start builds it again.
    if quantization and isinstance(named, str) and _is_quantized_copy_of(Path(named), record.get("source")):
        remove_if_changed(Path(named))
        if _is_quantized_copy_of(Path(named), record.get("source")):
            return BaseModel(source=recorded, path=named, quantization=quantization)
    return prepare_base(recorded, config.model.quantize_bits, config.model.trust_remote_code)


def _is_quantized_copy_of(path: Path, source: str | None) -> bool:
    try:
        made_from = json.loads((path / BASE_RECORD_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return False
    return made_from == source and (path / "config.json").is_file()


RESOLVE_ATTEMPTS = 3  # open_run: how often `latest` is looked up again when its checkpoint went meanwhile


@dataclass
class TrainedRun:
    """One checkpoint of a run, verified, with the base it was trained on."""

    run: Path
    checkpoint: Path  # holds adapters.safetensors + adapter_config.json: an mlx-lm adapter folder
    step: int
    config: object  # config.Config of the run
    adapter_config: dict
    base: BaseModel
    adapters: dict  # the checkpoint's adapter arrays, as verified against its manifest


def open_run(run: Path, checkpoint: str, purpose: str, allow_changed_base: bool = False) -> TrainedRun:
    """The run's chosen checkpoint (`latest`, `best`, `final` or a path), checked
    against its manifest, and its base as trained; UserError, one line, otherwise.
    `purpose` completes "no adapters to ..." (export, generate from). A base whose
    files changed since the checkpoint was saved is refused as the resume refuses it,
    unless `allow_changed_base` (then a note says what changed)."""
    from checkpoints import CheckpointCorruptError, CheckpointManager
    from config import Config

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    manager = CheckpointManager(run / "checkpoints")
    if not manager.has_any():
        raise UserError(f"{run}: no checkpoints, so no adapters to {purpose} (has a run been trained here?)")
    for attempt in range(RESOLVE_ATTEMPTS):
        info = manager.resolve(checkpoint)
        try:
            state = manager.load(info)
            break
        except (CheckpointCorruptError, FileNotFoundError) as exc:
            # A run still training here may have removed it meanwhile (retention): `latest`,
            # `best` and `final` then name another one.
            if checkpoint not in ("latest", "best", "final") or info.path.is_dir() or attempt + 1 == RESOLVE_ATTEMPTS:
                raise UserError(str(exc)) from None
    config = Config.from_saved(state.config, source=f"{info.path}/config.json")
    base = run_base_model(state.adapter_config, config)
    check_base_unchanged(state.trainer.get("inputs"), base, state.adapter_config, allow_changed_base)
    return TrainedRun(run=run, checkpoint=info.path, step=state.step, config=config,
                      adapter_config=state.adapter_config, base=base, adapters=state.adapters)


def check_base_unchanged(saved_inputs, base: BaseModel, adapter_config: dict, allow_changed: bool) -> None:
    """UserError when the base as given to the run (`base.source`) no longer has the files the
    checkpoint recorded: the adapters would be fused into, or run on, another model. Not asked
    where the base loaded is the quantized copy the run itself trained on, still there: that
    copy is the model as trained, whatever became of its source since."""
    from run_safety.file_identity import base_changed

    if base.path != base.source and base.path == adapter_config.get("model"):
        return
    try:
        local = local_model_dir(base.source)
    except UserError as exc:
        changed = str(exc)
    else:
        changed = base_changed(saved_inputs, local)
    if changed is None:
        return
    said = f"base model {base.source} changed since the run trained on it ({changed})"
    if not allow_changed:
        raise UserError(f"{said}: the adapters were trained on the earlier one; restore it, or give "
                        f"--allow-changed-base to use it as it is now")
    print(f"note: {said}; used as it is now (--allow-changed-base)", file=sys.stderr)


def load_trained_model(trained: TrainedRun):
    """(model, tokenizer, model config) as mlx_lm.load(adapter_path=CHECKPOINT) gives them: the
    base as trained, with mlx-lm's LoRA layers put on and the checkpoint's adapters loaded (in
    eval mode). The adapters are the arrays open_run verified, not the files read again: a run
    still training may have removed the checkpoint since (retention)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer, model_config = load_with_mlx_lm(trained.base.path, trained.config.model.trust_remote_code)
    config = trained.adapter_config
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "full":
        linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"],
                              use_dora=fine_tune_type == "dora")
    leaves = {"lora_a", "lora_b", "m"} if fine_tune_type != "full" else None
    expected = {name: value for name, value in tree_flatten(model.parameters())
                if leaves is None or name.rsplit(".", 1)[-1] in leaves}
    problem = names_mismatch(trained.adapters, expected) or shapes_mismatch(trained.adapters, expected, "the model's",
                                                                             dtypes=False)
    if problem:
        raise UserError(f"{trained.checkpoint}: its adapters do not fit the base {trained.base.path} ({problem})")
    model.load_weights(list(trained.adapters.items()), strict=False)
    model.eval()
    return model, tokenizer, model_config
