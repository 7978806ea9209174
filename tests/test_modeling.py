"""The base a run names is the model that was trained.

`mlx_lm.load(adapter_config["model"], adapter_path=RUN)` must give the
trainer's own validation loss on the same batches, and the logits of the
trainer's model (the base quantized in memory, as training always did, with
the adapters): for a base quantized on load and for an already quantized one.
The unquantized base with the same adapters is another model. After the
project has moved (its cache gone), the shared helper rebuilds the tiny model
and its quantized copy and still gives the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, read_metrics, run_in_process, write_corpus

PROBE = [[5, 100, 200, 300, 400, 17, 99, 1000, 3, 7] * 3]  # token ids of the tiny vocabulary (1024)
STEPS = 6
QUANTIZED_ON_LOAD = {"group_size": 64, "bits": 4, "mode": "affine"}


def train(root, *extra):
    corpus = write_corpus(root / "data", train=24, val=8)
    out = root / "run"
    result = run_in_process(*FAST, "--data-dir", corpus, "--output-dir", out, "--max-steps", STEPS,
                            "--eval-steps", STEPS, *extra)
    assert result.returncode == 0, result.stderr
    return corpus, out


def logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(PROBE)).astype(mx.float32))


def validation_loss(model, tokenizer, val_file) -> float:
    """What the trainer's validation computes with FAST settings (batch 4, 2 batches, 48 tokens)."""
    from corpus.batching import fixed_batches
    from corpus.index import CorpusIndex
    from monitoring.evaluation import compile_row_losses, loss_report, sample_losses

    index = CorpusIndex.build(val_file, tokenizer, 48 + 1, limit=4 * 2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = fixed_batches(index, 4, 2, pad)
    return loss_report(sample_losses(model, compile_row_losses(model), batches), index)["overall"]["loss"]


def final_state(out):
    from checkpoints import CheckpointManager
    from config import Config

    manager = CheckpointManager(out / "checkpoints")
    state = manager.load(manager.resolve("final"))
    return state, Config.from_dict(state.config)


@pytest.mark.parametrize("base_kind", ["quantized on load", "already quantized"])
def test_the_base_a_run_names_gives_the_trained_model(tmp_path, base_kind):
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import quantize_model

    from base_model import loading, trained_run

    tiny = loading.resolve_model("tiny")
    if base_kind == "quantized on load":
        source = tiny
        corpus, out = train(tmp_path)
    else:
        # What `mlx_lm convert -q` writes: the quantized copy, taken as a model of its own.
        source = str(tmp_path / "tiny-4bit")
        shutil.copytree(loading.prepare_base(tiny, 4).path, source)
        corpus, out = train(tmp_path, "--model", source)

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    if base_kind == "quantized on load":
        assert adapter_config["base_model"] == {"source": tiny, "quantized_on_load": QUANTIZED_ON_LOAD}
        named = Path(adapter_config["model"])  # the quantized copy, written once
        assert named != Path(tiny)
        assert json.loads((named / "config.json").read_text())["quantization"] == QUANTIZED_ON_LOAD
    else:
        assert adapter_config["model"] == source
        assert adapter_config["base_model"] == {"source": source, "quantized_on_load": None}

    model, tokenizer = load(adapter_config["model"], adapter_path=str(out))

    # The trainer's own figure, at the step of these adapters.
    last = [line for line in read_metrics(out) if "val_ce" in line][-1]
    assert last["step"] == STEPS
    assert validation_loss(model, tokenizer, corpus / "val.jsonl") == pytest.approx(last["val_ce"], rel=1e-6)

    # The trainer's model as training has always built it: the base loaded and,
    # when not quantized, quantized in memory; the same adapters put on.
    reference, _, config = load(source, return_config=True)
    if base_kind == "quantized on load":
        reference, _ = quantize_model(reference, config, group_size=64, bits=4)
    reference = load_adapters(reference, str(out))
    reference.eval()
    assert np.abs(logits(model) - logits(reference)).max() <= 1e-5

    if base_kind == "quantized on load":
        # What the README's old command loaded: the float base, which the adapters never saw.
        float_model, _ = load(tiny, adapter_path=str(out))
        assert np.abs(logits(float_model) - logits(model)).max() > 0.1

    state, config = final_state(out)
    assert trained_run.run_base_model(state.adapter_config, config).path == adapter_config["model"]


def test_a_moved_project_rebuilds_the_tiny_base_and_its_quantized_copy(tmp_path, monkeypatch):
    from mlx_lm import load

    from base_model import trained_run

    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache-before"))
    _, out = train(tmp_path)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["model"].startswith(str(tmp_path / "cache-before"))
    before = logits(load(adapter_config["model"], adapter_path=str(out))[0])

    # The project moved: the recorded tiny model and quantized copy are gone.
    shutil.rmtree(tmp_path / "cache-before")
    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache-after"))
    state, config = final_state(out)
    base = trained_run.run_base_model(state.adapter_config, config)
    assert base.path.startswith(str(tmp_path / "cache-after" / "quantized"))
    assert base.quantization == QUANTIZED_ON_LOAD
    trained = trained_run.open_run(out, "latest", "test")
    model, _, _ = trained_run.load_trained_model(trained)
    assert np.array_equal(logits(model), before)  # rebuilt byte for byte: the very same model


def test_quantizing_on_load_is_written_once_and_loads_as_the_base_quantized_in_memory(tmp_path, monkeypatch):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import quantize_model

    from base_model import loading

    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))
    first = loading.load_model("tiny", quantize_bits=4)
    copy = Path(first.base.path)
    written = (copy / "model.safetensors").stat().st_mtime_ns
    again = loading.load_model("tiny", quantize_bits=4)
    assert again.base.path == str(copy) and first.path == again.path == loading.resolve_model("tiny")
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]
    assert (copy / "model.safetensors").stat().st_mtime_ns == written  # written once
    assert first.quantized_bits == 4 and first.base.quantization == QUANTIZED_ON_LOAD

    in_memory, _, config = load(first.path, return_config=True)
    in_memory, _ = quantize_model(in_memory, config, group_size=64, bits=4)
    loaded = dict(tree_flatten(first.model.parameters()))
    expected = dict(tree_flatten(in_memory.parameters()))
    assert loaded.keys() == expected.keys()
    assert all(mx.array_equal(loaded[k], expected[k]).item() and loaded[k].dtype == expected[k].dtype for k in loaded)

    # --quantize-bits 0 keeps the base: nothing to copy, the base itself is named.
    plain = loading.load_model("tiny", quantize_bits=0)
    assert plain.base.path == plain.path and plain.quantized_bits is None
