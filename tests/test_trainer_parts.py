"""DistrustTrainer built in-process, each public method used on its own (no `fit`)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from conftest import load_tiny, write_corpus


def build_trainer(tmp_path: Path):
    from checkpoints import CheckpointManager
    from config import Config
    from corpus.index import CorpusIndex
    from base_model.lora import adapter_config, attach_lora
    from training.trainer import DistrustTrainer

    data = write_corpus(tmp_path / "data", train=16, val=0)
    out = tmp_path / "run"
    config = Config.from_dict({"model": "tiny", "data_dir": str(data), "output_dir": str(out), "batch_size": 4,
                               "max_seq_length": 32, "lora_rank": 4, "max_steps": 3, "tensorboard": False},
                              source="test")
    loaded = load_tiny()
    layers, _ = attach_lora(loaded.model, 4, 8.0, -1, 0.0, 0)
    index = CorpusIndex.build(data / "train.jsonl", loaded.tokenizer, 33)
    manager = CheckpointManager(out / "checkpoints", keep=2)
    trainer = DistrustTrainer(config, loaded.model, loaded.tokenizer,
                              adapter_config(loaded.path, layers, 4, 8.0, 0.0), index, None, out, manager,
                              log=lambda message: None)
    return trainer, manager, out


def test_training_state_save_checkpoint_and_write_adapters_work_before_fit(tmp_path, capsys):
    trainer, manager, out = build_trainer(tmp_path)
    state = trainer.training_state()
    assert state.step == 0 and state.trainer["progress"]["updates_seen"] == 0
    assert trainer.save_checkpoint()
    saved = manager.latest_valid()
    assert saved is not None and saved.step == 0
    # save_checkpoint copied the adapters to the top of the run, as mlx_lm loads them
    top = mx.load(str(out / "adapters.safetensors"))
    in_checkpoint = mx.load(str(saved.path / "adapters.safetensors"))
    assert top.keys() == in_checkpoint.keys() and all(mx.array_equal(top[k], in_checkpoint[k]).item() for k in top)
    assert f"checkpoint: {saved.path}" in capsys.readouterr().err

    (out / "adapters.safetensors").unlink()
    trainer.write_adapters(saved.path)
    assert (out / "adapters.safetensors").is_file()


def test_a_restored_trainer_carries_the_smoothing_windows_into_its_next_checkpoint(tmp_path):
    trainer, manager, out = build_trainer(tmp_path)
    end = trainer.fit()
    assert end.exit_code == 0
    final = manager.final()
    saved = manager.load(final)
    again, _, _ = build_trainer(tmp_path / "again")
    again.restore(saved, final.path)
    # Before any fit: the state it would save is the one it restored.
    assert again.training_state().trainer["progress"] == saved.trainer["progress"]
    assert saved.trainer["progress"]["updates_seen"] == 3
