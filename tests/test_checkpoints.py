"""CheckpointManager and TrainingState: real mx arrays, real files, real failures where we can make them."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from checkpoints import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointSaveError,
    RetentionPolicy,
    TrainingState,
)
from checkpoints.manager import CheckpointInfo
from checkpoints.state import STATE_FILES
from run_safety.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
LORA_A = "model.layers.1.self_attn.q_proj.lora_a"
LORA_B = "model.layers.1.self_attn.q_proj.lora_b"


def make_state(step: int, *, loss: float | None = None, val_loss: float | None = None, width: int = 8) -> TrainingState:
    """A state whose every value depends on `step`, so that two steps never look alike."""
    key = mx.random.key(step)
    k1, k2 = mx.random.split(key)
    trainer = {
        "data": {"epoch": 0, "index": step * 8, "permutation_seed": 7},
        "early_stopping": {"best": None, "bad_checks": 0},  # null: no best yet (never NaN or Infinity)
    }
    if loss is not None:
        trainer["loss"] = loss
    if val_loss is not None:
        trainer["val_loss"] = val_loss
    return TrainingState(
        step=step,
        adapters={
            LORA_A: mx.random.normal((width, 4), key=k1),
            LORA_B: mx.random.normal((4, width), key=k2).astype(mx.bfloat16),
        },
        optimizer={
            "step": mx.array(step, dtype=mx.uint64),
            "learning_rate": mx.array(1e-4),
            f"{LORA_A}.m": mx.full((width, 4), step / 10),
        },
        trainer=trainer,
        config={"model": "tiny", "lora": {"rank": 4}, "seed": 0},
        fingerprint="f" * 64,
        adapter_config={"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}},
    )


def same_bits(a: mx.array, b: mx.array) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]
    return bool(mx.array_equal(mx.view(a, as_bytes), mx.view(b, as_bytes)))


def assert_states_equal(a: TrainingState, b: TrainingState) -> None:
    assert a.step == b.step
    for group in ("adapters", "optimizer"):
        x, y = getattr(a, group), getattr(b, group)
        assert x.keys() == y.keys()
        for name in x:
            assert same_bits(x[name], y[name]), f"{group}[{name}] differs"
    # json.dumps compares NaN and inf as well (NaN != NaN as floats)
    for group in ("trainer", "config", "adapter_config"):
        assert json.dumps(getattr(a, group), sort_keys=True) == json.dumps(getattr(b, group), sort_keys=True)
    assert a.fingerprint == b.fingerprint


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def manager(tmp_path, warnings) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", keep=3, warn=warnings.append)


# ---------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(manager, warnings):
    state = make_state(250, loss=1.25, val_loss=0.5)
    state.adapters["scalar"] = mx.array(3.5, dtype=mx.float16)
    state.adapters["ints"] = mx.arange(10, dtype=mx.int32)
    state.trainer["windows"] = {"loss": [1.0, 2.5, None], "tokens_per_s": []}  # null: a step that was not a number
    state.trainer["step"] = "the trainer's own key, not ours"

    path = manager.save(state)

    assert path == manager.directory / "step-00000250"
    assert sorted(os.listdir(path)) == sorted([*STATE_FILES, "manifest.json"])
    assert_states_equal(manager.load(path), state)
    info = manager.checkpoints()[0]
    assert (info.step, info.valid, info.problem, info.loss, info.val_loss) == (250, True, None, 1.25, 0.5)
    assert info.size_bytes == sum(f.stat().st_size for f in path.iterdir())
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(STATE_FILES)
    assert set(manifest["versions"]) == {"mlx", "mlx_lm", "numpy", "python"}
    assert manifest["created"].endswith("Z")
    assert warnings == []


def test_optimizer_state_restores_into_a_fresh_optimizer(manager):
    mx.random.seed(3)
    model = nn.Linear(6, 3)
    optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    x, y = mx.random.normal((5, 6)), mx.random.normal((5, 3))

    def loss_fn(m):
        return ((m(x) - y) ** 2).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    _, grads = grad_fn(model)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)

    manager.save(TrainingState(
        step=1,
        adapters=dict(tree_flatten(model.parameters())),
        optimizer=dict(tree_flatten(optimizer.state)),
        trainer={}, config={}, fingerprint="", adapter_config={},
    ))
    loaded = manager.load(manager.resolve("latest").path)

    restored_model = nn.Linear(6, 3)  # different initial weights, overwritten below
    restored_model.update(tree_unflatten(list(loaded.adapters.items())))
    restored_optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    restored_optimizer.state = tree_unflatten(list(loaded.optimizer.items()))
    assert set(loaded.optimizer) >= {"step", "learning_rate"}

    for m, opt in ((model, optimizer), (restored_model, restored_optimizer)):
        _, grads = nn.value_and_grad(m, loss_fn)(m)
        opt.update(m, grads)
        mx.eval(m.parameters(), opt.state)
    for original, restored in ((model.parameters(), restored_model.parameters()),
                               (optimizer.state, restored_optimizer.state)):
        original, restored = dict(tree_flatten(original)), dict(tree_flatten(restored))
        assert original.keys() == restored.keys()
        for name in original:
            assert same_bits(original[name], restored[name]), name


def test_a_checkpoint_is_an_mlx_lm_adapter_directory(manager):
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

    def tiny_model():
        args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                               num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=2)
        return llama.Model(args)

    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    mx.random.seed(1)
    trained = tiny_model()
    trained.freeze()
    linear_to_lora_layers(trained, 2, lora)
    adapters = dict(tree_flatten(trained.trainable_parameters()))
    adapters = {name: value + 1 for name, value in adapters.items()}  # not the fresh init
    path = manager.save(TrainingState(
        step=5, adapters=adapters, optimizer={}, trainer={}, config={}, fingerprint="",
        adapter_config={"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora, "model": "tiny"},
    ))

    mx.random.seed(2)
    fresh = load_adapters(tiny_model(), str(path))
    loaded = dict(tree_flatten(fresh.parameters()))
    assert adapters and all(name.endswith((".lora_a", ".lora_b")) for name in adapters)
    for name in adapters:
        assert same_bits(loaded[name], adapters[name]), name


# ------------------------------------------------------------------ rejected


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.optimizer.__setitem__("learning_rate", 1e-4), "optimizer['learning_rate']"),
        (lambda s: s.adapters.__setitem__(LORA_A, [1.0, 2.0]), LORA_A),
        (lambda s: s.trainer.__setitem__("rng", (1, (2, 3), None)), "trainer['rng']"),
        (lambda s: s.trainer.__setitem__("weights", mx.ones(3)), "trainer['weights']"),
        (lambda s: s.config.__setitem__("layers", {1: "a"}), "key 1"),
    ],
)
def test_values_that_would_not_round_trip_are_refused_before_writing(manager, change, named):
    state = make_state(3)
    change(state)
    with pytest.raises(TypeError, match=named.replace("[", r"\[").replace("]", r"\]")):
        manager.save(state)
    assert entries(manager.directory) == []


# ---------------------------------------------------------------- corruption


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [flip_byte, truncate, delete], ids=lambda f: f.__name__)
@pytest.mark.parametrize("file_name", [*STATE_FILES, "manifest.json"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(manager, warnings, file_name, damage):
    for step in (100, 200, 300):
        manager.save(make_state(step, loss=1.0))
    assert [i.valid for i in manager.checkpoints()] == [True, True, True]
    assert manager.latest_valid().step == 300
    assert warnings == []  # no false alarm on clean checkpoints

    damage(manager.directory / "step-00000300" / file_name)

    newest = manager.checkpoints()[-1]
    assert not newest.valid and file_name in newest.problem
    assert [i.valid for i in manager.checkpoints()[:-1]] == [True, True]
    assert manager.latest_valid().step == 200
    assert len(warnings) == 1 and "step-00000300" in warnings[0] and file_name in warnings[0]
    with pytest.raises(CheckpointCorruptError, match=file_name):
        manager.load(newest.path)
    with pytest.raises(UserError, match="step-00000300.*is invalid"):
        manager.resolve(str(newest.path))
    assert_states_equal(manager.load(manager.resolve("latest").path), make_state(200, loss=1.0))


def test_a_manifest_that_is_not_json_or_not_ours_is_named(manager):
    manager.save(make_state(1))
    manager.save(make_state(2))
    manifest = manager.directory / "step-00000002" / "manifest.json"
    manifest.write_text("{ not json")
    assert "manifest.json is not valid JSON" in manager.checkpoints()[-1].problem
    manifest.write_text(json.dumps({"files": {}}))
    assert "not a distrust-qlora-checkpoint manifest" in manager.checkpoints()[-1].problem
    assert manager.latest_valid().step == 1


def test_an_edited_loss_in_the_manifest_is_caught(manager):
    manager.save(make_state(1, loss=2.0))
    path = manager.directory / "step-00000001" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["loss"] = 0.5
    path.write_text(json.dumps(manifest))
    assert "does not match its own SHA-256" in manager.checkpoints()[0].problem


def test_many_clean_checkpoints_raise_no_false_alarm(tmp_path, warnings):
    manager = CheckpointManager(tmp_path / "c", keep=50, fsync=False, warn=warnings.append)
    for step in range(1, 31):
        manager.save(make_state(step, loss=1 / step, width=step), is_best=step % 7 == 0)
    infos = manager.checkpoints()
    assert len(infos) == 30 and all(i.valid and i.problem is None for i in infos)
    assert manager.latest_valid().step == 30 and manager.best().step == 28
    assert warnings == []


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_an_infinity_is_refused_by_name_before_anything_is_written(manager, bad):
    """Standard JSON has no NaN or Infinity: whoever owns such a value encodes it (null)."""
    manager.save(make_state(1))
    state = make_state(2, loss=1.0)
    state.trainer["windows"] = {"loss": [1.0, bad]}
    with pytest.raises(TypeError, match=re.escape("TrainingState.trainer['windows']['loss'][1]")):
        manager.save(state)
    assert_only_the_first_checkpoint(manager)


# --------------------------------------------------------- failure injection


def assert_only_the_first_checkpoint(manager: CheckpointManager) -> None:
    assert entries(manager.directory) == ["step-00000001"]  # no partial dir, no temporary
    info = manager.latest_valid()
    assert info.step == 1 and info.valid
    assert_states_equal(manager.load(info.path), make_state(1))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EACCES])
def test_a_failing_writer_leaves_the_previous_checkpoint(manager, monkeypatch, code):
    manager.save(make_state(1))

    def failing_writer(file, arrays, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mx, "save_safetensors", failing_writer)
    with pytest.raises(CheckpointSaveError) as caught:
        manager.save(make_state(2))
    assert "step-00000002" in str(caught.value) and os.strerror(code) in str(caught.value)
    assert caught.value.cause.errno == code
    assert caught.value.parameter is None  # every array fails alike: none is to blame
    assert_only_the_first_checkpoint(manager)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failing_fsync_leaves_the_previous_checkpoint(manager, monkeypatch, code):
    manager.save(make_state(1))

    def failing_flush(fd):
        raise OSError(code, os.strerror(code))

    # flush_fd is the one flush of every platform (fsync, or F_FULLFSYNC on macOS):
    # replaced wherever it was imported, so the failure is reached on any OS.
    import checkpoints.manifest
    import checkpoints.state
    from run_safety import durable

    for module in (durable, checkpoints.state, checkpoints.manifest):
        monkeypatch.setattr(module, "flush_fd", failing_flush)
    with pytest.raises(CheckpointSaveError, match=os.strerror(code)):
        manager.save(make_state(2))
    monkeypatch.undo()
    assert_only_the_first_checkpoint(manager)


def test_the_parameter_that_fails_to_write_is_named(manager, monkeypatch):
    manager.save(make_state(1))
    real_writer = mx.save_safetensors

    def writer_failing_on_lora_b(file, arrays, *args, **kwargs):
        if LORA_B in arrays:  # mlx's own wording for a failed write
            raise RuntimeError("[write] Unable to write 128 bytes to file.")
        return real_writer(file, arrays, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", writer_failing_on_lora_b)
    with pytest.raises(CheckpointSaveError) as caught:
        manager.save(make_state(2))
    assert caught.value.parameter == LORA_B
    assert LORA_B in str(caught.value) and "adapters.safetensors" in str(caught.value)
    assert "MB free" in str(caught.value)  # mlx gave no reason: the free space is offered
    monkeypatch.undo()
    assert_only_the_first_checkpoint(manager)


def test_a_failing_commit_rename_restores_the_replaced_checkpoint(manager, monkeypatch):
    manager.save(make_state(1))
    manager.save(make_state(2, loss=5.0))
    real_rename = os.rename

    def rename_refusing_temporaries(src, dst):
        if Path(src).name.startswith(".tmp-step-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_refusing_temporaries)
    with pytest.raises(CheckpointSaveError, match="Permission denied"):
        manager.save(make_state(2, loss=9.0))  # a resumed run saving step 2 again
    monkeypatch.undo()
    assert entries(manager.directory) == ["step-00000001", "step-00000002"]
    assert manager.load(manager.latest_valid().path).trainer["loss"] == 5.0


SUBPROCESS_PRELUDE = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_checkpoints import make_state, LORA_B
from checkpoints import CheckpointManager, CheckpointSaveError, TrainingState
import mlx.core as mx
"""


def run_python(code: str, *args: str, **popen_args):
    command = [sys.executable, "-c", SUBPROCESS_PRELUDE + textwrap.dedent(code), str(SRC), str(Path(__file__).parent), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_args)


def test_a_real_write_beyond_the_file_size_limit_fails_cleanly(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk would."""
    pytest.importorskip("resource")
    process = run_python("""
        import json, resource, signal
        manager = CheckpointManager(sys.argv[3], keep=3)
        manager.save(make_state(1))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        state = make_state(2)
        state.adapters[LORA_B] = mx.zeros((256, 256))  # 256 KiB: over the limit on its own
        try:
            manager.save(state)
            print(json.dumps({"saved": True}))
        except CheckpointSaveError as error:
            print(json.dumps({"error": str(error), "parameter": error.parameter}))
    """, str(tmp_path / "checkpoints"))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert "File too large" in result["error"] and "step-00000002" in result["error"]
    assert result["parameter"] == LORA_B and LORA_B in result["error"]
    assert_only_the_first_checkpoint(CheckpointManager(tmp_path / "checkpoints"))


def test_saves_killed_at_random_moments_leave_only_whole_checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    next_step, last_committed = 1, None
    for round_number in range(8):
        process = run_python("""
            manager = CheckpointManager(sys.argv[3], keep=2, warn=lambda message: None)
            manager.clean_temporaries()
            step = int(sys.argv[4])
            print("ready", flush=True)
            while True:
                manager.save(make_state(step, loss=float(step), width=64 * 1024), is_best=step % 3 == 0)
                print("committed", step, flush=True)
                if step % 2 == 0:  # a resumed run saving the same step again: replace it
                    manager.save(make_state(step, loss=float(step), width=64 * 1024))
                    print("committed", step, flush=True)
                step += 1
        """, str(directory), str(next_step))
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        out, _ = process.communicate()
        committed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        last_committed = committed[-1] if committed else last_committed

        manager = CheckpointManager(directory, keep=2, fsync=False, warn=lambda message: None)
        visible = manager.checkpoints()
        assert all(info.valid for info in visible), (seed, round_number, [(i.path.name, i.problem) for i in visible])
        manager.clean_temporaries()
        assert not [name for name in entries(directory) if name.startswith(".tmp-")], (seed, entries(directory))
        if last_committed is not None:
            latest = manager.latest_valid()
            assert latest.step >= last_committed, (seed, round_number)
            assert_states_equal(manager.load(latest.path), make_state(latest.step, loss=float(latest.step), width=64 * 1024))
            next_step = latest.step + 1
    assert last_committed is not None, "no save ever completed: the kill loop tests nothing"


# ----------------------------------------------------------------- retention


def info(step: int, *, valid=True, best=False, final=False) -> CheckpointInfo:
    return CheckpointInfo(path=Path(f"step-{step:08d}"), step=step, valid=valid, problem=None if valid else "x",
                          loss=None, val_loss=None, size_bytes=0, is_best=best, is_final=final)


def steps(infos) -> list[int]:
    return [i.step for i in infos]


def test_retention_policy_as_a_value():
    policy = RetentionPolicy(keep_last=2)
    assert steps(policy.to_delete([info(s) for s in (1, 2, 3, 4)])) == [1, 2]
    assert steps(policy.to_delete([info(1, best=True), info(2), info(3, final=True), info(4), info(5)])) == [2]
    assert steps(policy.to_delete([info(1), info(2), info(3), info(4)], protected={"step-00000001"})) == [2]
    # an invalid one in the window is kept without taking a place; beyond it, it goes
    assert steps(policy.to_delete([info(1), info(2, valid=False), info(3), info(4, valid=False), info(5)])) == [1, 2]
    # nothing goes while no newer valid checkpoint exists
    assert policy.to_delete([info(1), info(2), info(3, valid=False), info(4, valid=False)]) == []
    assert policy.to_delete([info(s, valid=False) for s in range(9)]) == []
    # the one just written stays even behind newer (stale) ones, and takes a place
    assert steps(policy.to_delete([info(1), info(2), info(7), info(8)], just_saved="step-00000002")) == [1]
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=0)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(1, 2), st.booleans(), st.booleans()),  # advance, is_best, val loss
        st.tuples(st.just("crash"), st.booleans(), st.booleans()),  # leave a temp dir, clean at restart
        st.tuples(st.just("resume"), st.integers(0, 100)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keep=st.integers(1, 3), ops=operations)
def test_retention_keeps_what_must_be_kept(keep, ops):
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / "checkpoints"

        def new_manager():
            return CheckpointManager(directory, keep=keep, fsync=False, warn=lambda message: None)

        manager = new_manager()
        step, last_saved, best, protected, max_step = 0, None, None, None, 0
        for op in ops:
            names_before = {i.path.name for i in manager.checkpoints()}
            if op[0] == "save":
                _, advance, is_best, validated = op
                step += advance
                val_loss = 1.0 / step if validated else None
                name = manager.save(make_state(step, loss=1.0, val_loss=val_loss), is_best=is_best).name
                if is_best:
                    best = name
                elif best == name:  # replaced by a state that is not the best
                    best = None
                last_saved, max_step = name, max(max_step, step)
            elif op[0] == "crash":
                _, leave_temp, clean = op
                if leave_temp:
                    temp = directory / f".tmp-step-{step + 1:08d}-{os.getpid()}"
                    temp.mkdir(parents=True, exist_ok=True)
                    (temp / "adapters.safetensors").write_bytes(b"partial")
                manager, protected = new_manager(), None
                if clean:
                    manager.clean_temporaries()
            else:  # a resume is a new process: a new manager that protects what it resumed from
                manager, protected = new_manager(), None
                valid = [i for i in manager.checkpoints() if i.valid]
                if valid:
                    chosen = valid[op[1] % len(valid)]
                    manager.protect(chosen.path)
                    protected, step = chosen.path.name, chosen.step

            infos = manager.checkpoints()
            names = {i.path.name for i in infos}
            assert all(i.valid for i in infos)  # temp dirs never show
            if op[0] != "save":
                assert names == names_before  # only a save (after its commit) deletes anything
                continue
            assert last_saved in names and best == (manager.best().path.name if manager.best() else None)
            assert max(i.step for i in infos) == max_step  # the newest by step is kept
            assert protected is None or protected in names
            rolling = [i for i in infos if not (i.is_best or i.is_final or i.path.name in (protected, last_saved))]
            assert len(rolling) <= keep
            if max_step == step:  # no newer checkpoints left from before a resume
                assert len(rolling) + (last_saved not in (best, protected)) <= keep
        manager.clean_temporaries()
        assert not [p for p in entries(directory) if p.startswith(".tmp-")]


def test_final_and_best_pointers_survive_retention(manager):
    manager.save(make_state(1, val_loss=0.5), is_best=True)
    for step in range(2, 8):
        manager.save(make_state(step, val_loss=1.0), is_final=step == 3)
    assert steps(manager.checkpoints()) == [1, 3, 5, 6, 7]
    assert manager.best().step == 1 and manager.final().step == 3
    assert (manager.directory / "best").read_text().strip() == "step-00000001"


def test_replacing_the_best_with_a_state_that_is_not_drops_the_pointer(manager, warnings):
    manager.save(make_state(1))
    manager.save(make_state(2, val_loss=0.1), is_best=True)
    manager.save(make_state(2, val_loss=0.9))
    assert manager.best() is None
    assert manager.load(manager.latest_valid().path).trainer["val_loss"] == 0.9
    with pytest.raises(TypeError, match="val_loss"):  # a NaN is never written, so never marked best
        manager.save(make_state(3, val_loss=float("nan")), is_best=True)
    assert manager.best() is None and entries(manager.directory) == ["step-00000001", "step-00000002"]


def test_a_protected_checkpoint_is_never_deleted(manager):
    for step in range(1, 4):
        manager.save(make_state(step))
    manager.protect(manager.resolve("step-00000001").path)
    for step in range(4, 10):
        manager.save(make_state(step))
    assert steps(manager.checkpoints()) == [1, 7, 8, 9]


# -------------------------------------------------- temporaries, move aside


def test_clean_temporaries_removes_leftovers_and_restores_an_interrupted_replacement(manager, warnings):
    manager.save(make_state(1))
    manager.save(make_state(2))
    d = manager.directory
    os.rename(d / "step-00000002", d / ".tmp-replaced-step-00000002-999999")  # killed between the two renames:
    (d / ".tmp-step-00000002-999999").mkdir()  # its replacement never arrived
    (d / ".tmp-step-00000003-999999").mkdir()
    (d / ".tmp-deleting-step-00000000-999999").mkdir()
    (d / ".tmp-best-999999").write_text("step-00000002")
    (d / ".tmp-step-00000004-1").mkdir()  # pid 1 is alive: another process may be saving
    assert steps(manager.checkpoints()) == [1]

    removed = manager.clean_temporaries()

    assert sorted(p.name for p in removed) == [
        ".tmp-best-999999", ".tmp-deleting-step-00000000-999999", ".tmp-step-00000002-999999",
        ".tmp-step-00000003-999999",
    ]
    assert entries(d) == [".tmp-step-00000004-1", "step-00000001", "step-00000002"]
    assert manager.latest_valid().step == 2 and "restored checkpoint step-00000002" in warnings[0]


def test_move_aside_keeps_everything(manager, tmp_path):
    assert manager.move_aside() is None  # nothing there yet
    for step in (1, 2):
        manager.save(make_state(step), is_best=step == 1)
    before = {p.relative_to(manager.directory): p.read_bytes() for p in manager.directory.rglob("*") if p.is_file()}

    moved = manager.move_aside()

    assert moved.parent == tmp_path and moved.name.startswith("checkpoints.old-") and moved.name.endswith("Z")
    assert not manager.directory.exists() and manager.checkpoints() == [] and manager.latest_valid() is None
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    manager.save(make_state(3))
    second = manager.move_aside()
    assert second != moved and second.exists() and moved.exists()


# -------------------------------------------------------------------- resolve


def test_resolve_finds_latest_best_and_paths(manager, tmp_path):
    manager.save(make_state(1, val_loss=0.3), is_best=True)
    manager.save(make_state(2, val_loss=0.4))
    assert manager.resolve("latest").step == 2
    assert manager.resolve("best").step == 1
    assert manager.resolve(str(manager.directory / "step-00000002")).step == 2
    assert manager.resolve("step-00000001").step == 1
    elsewhere = CheckpointManager(tmp_path / "other")
    assert elsewhere.resolve(str(manager.directory / "step-00000001")).step == 1


def test_resolve_says_in_one_line_why_there_is_nothing(manager):
    for spec, message in [("latest", "no checkpoint to resume from"), ("best", "no best checkpoint"),
                          ("final", "no final checkpoint"), ("nowhere/step-00000009", "does not exist")]:
        with pytest.raises(UserError, match=message) as caught:
            manager.resolve(spec)
        assert "\n" not in str(caught.value)
    manager.save(make_state(1), is_best=True)
    (manager.directory / "step-00000001" / "optimizer.safetensors").unlink()
    with pytest.raises(UserError, match=r"no valid checkpoint .* optimizer.safetensors is missing"):
        manager.resolve("latest")
    with pytest.raises(UserError, match="the best checkpoint .* is invalid: optimizer.safetensors is missing"):
        manager.resolve("best")
    (manager.directory / "notes.txt").write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        manager.resolve(str(manager.directory / "notes.txt"))
