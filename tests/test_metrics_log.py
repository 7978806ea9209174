"""MetricsLog: metrics.jsonl lines and TensorBoard scalars, read back from the files."""

import json
import math

import numpy as np

from conftest import read_tensorboard
from monitoring.metrics_log import MetricsLog, summary_text


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(events):
    return [(value.tag, event.step, value.simple_value)
            for event in events for value in event.summary.value]


def as_tensorboard_shows(events):
    """Scalars after TensorBoard's purge: a SessionLog START at step s hides
    what was logged before it at steps >= s."""
    visible = []
    for event in events:
        if event.HasField("session_log"):
            visible = [item for item in visible if item[1] < event.step]
        visible += scalars([event])
    return visible


def test_lines_parse_and_nan_is_written_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, loss=2.5, lr=1e-4, grad_norm=math.nan, tokens=512, note="warmup")
    log.log(2, loss=math.inf, lr=np.float32(2e-4), tokens=np.int64(600))
    log.log_validation(2, val_loss=2.25, val_objective=math.nan)
    log.close()

    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert lines[0] == {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": None,
                        "tokens": 512, "note": "warmup"}
    assert lines[1]["loss"] is None
    assert lines[1]["tokens"] == 600 and abs(lines[1]["lr"] - 2e-4) < 1e-9
    assert lines[2] == {"step": 2, "val_loss": 2.25, "val_objective": None}


def test_each_line_is_on_disk_before_close(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, loss=1.0)
    assert read_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    log.close()


def test_validation_keys_get_the_val_prefix(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log_validation(5, loss=1.5, loss_low_auth=1.2)
    log.close()
    assert read_lines(tmp_path / "metrics.jsonl") == [
        {"step": 5, "val_loss": 1.5, "val_loss_low_auth": 1.2}
    ]


def test_end_line_is_last_and_says_why(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, loss=1.0)
    log.end("plateau: no improvement", steps=1, best_val_loss=math.nan)
    log.close()
    lines = read_lines(tmp_path / "metrics.jsonl")
    assert lines[-1] == {"event": "end", "reason": "plateau: no improvement",
                         "steps": 1, "best_val_loss": None}


def test_resume_drops_what_came_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 9):
        log.log(step, loss=1.0 / step)
        if step % 4 == 0:
            log.log_validation(step, val_loss=2.0 / step)
    log.end("interrupted (SIGINT)")
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line torn by a crash

    resumed = MetricsLog(tmp_path, tensorboard=False, resume_step=4)
    # already rewritten before anything new is logged
    kept = read_lines(tmp_path / "metrics.jsonl")
    assert [(line["step"], "val_loss" in line) for line in kept] == [
        (1, False), (2, False), (3, False), (4, False), (4, True)
    ]
    for step in range(5, 9):
        resumed.log(step, loss=1.0 / step)
        if step % 4 == 0:
            resumed.log_validation(step, val_loss=2.0 / step)
    resumed.end("finished")
    resumed.close()

    uninterrupted_dir = tmp_path / "uninterrupted"
    log = MetricsLog(uninterrupted_dir, tensorboard=False)
    for step in range(1, 9):
        log.log(step, loss=1.0 / step)
        if step % 4 == 0:
            log.log_validation(step, val_loss=2.0 / step)
    log.end("finished")
    log.close()

    resumed_text = (tmp_path / "metrics.jsonl").read_text()
    assert resumed_text == (uninterrupted_dir / "metrics.jsonl").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_run_moves_an_old_log_aside(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, loss=3.0)
    log.close()
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, loss=2.0)
    log.close()
    log = MetricsLog(tmp_path, tensorboard=False)  # within the same second
    log.log(1, loss=1.0)
    log.close()
    assert read_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    old = sorted(json.loads(path.read_text())["loss"]
                 for path in tmp_path.glob("metrics.jsonl.before-*"))
    assert old == [2.0, 3.0]


def test_tensorboard_event_files_hold_the_grouped_tags(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(1, objective=2.5, ce=2.4, distrust=0.1, lr=1e-4, grad_norm=3.0,
            tokens_per_sec=1234.0, memory_mb=900.0, custom=7, note="text", flag=True)
    log.log_validation(1, val_ce=2.2, val_ce_low_auth=2.0,
                       val_ce_high_auth=2.4, val_objective=2.3, val_ce_gap=-0.4)
    log.close()

    logged = scalars(read_tensorboard(tmp_path / "logs"))
    tags = {tag for tag, _, _ in logged}
    assert tags == {
        "train/objective", "train/ce", "train/distrust", "train/lr", "train/grad_norm",
        "train/tokens_per_sec", "train/memory_mb", "misc/custom",
        "val/ce", "val/ce_low_auth", "val/ce_high_auth", "val/objective",
        "val/ce_gap_primary_minus_consensus",
    }
    assert ("train/objective", 1, 2.5) in logged
    assert any(tag == "val/ce" and step == 1 and abs(v - 2.2) < 1e-6 for tag, step, v in logged)


def test_tensorboard_resume_purges_after_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.log(step, objective=float(step))
    log.close()
    resumed = MetricsLog(tmp_path, resume_step=3)
    for step in range(4, 7):
        resumed.log(step, objective=10.0 * step)
    resumed.close()

    events = read_tensorboard(tmp_path / "logs")
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 2
    assert ("train/objective", 5, 5.0) in scalars(events)  # the first run's file is intact
    assert as_tensorboard_shows(events) == [
        ("train/objective", 1, 1.0), ("train/objective", 2, 2.0), ("train/objective", 3, 3.0),
        ("train/objective", 4, 40.0), ("train/objective", 5, 50.0), ("train/objective", 6, 60.0),
    ]


def test_summary_text_says_what_a_user_needs():
    text = summary_text(reason="finished max_steps", steps=2000, max_steps=2000,
                        tokens=3_600_000, seconds=3723.0, best_val_loss=1.23456,
                        best_val_step=1750, adapters="models/distrust-tiny")
    assert text.splitlines()[0] == "Run ended: finished max_steps"
    assert "2000 / 2000" in text
    assert "3,600,000" in text and "967 tok/s" in text
    assert "1h 02m 03s" in text
    assert "1.2346 at step 1750" in text
    assert "models/distrust-tiny" in text
    assert len(text.splitlines()) <= 8


def test_summary_text_without_validation():
    for missing in (None, math.nan, "nan"):
        text = summary_text(reason="stopped", steps=3, best_val_loss=missing)
        assert "best val  none" in text


def test_lines_keep_loss_and_val_loss_beside_todays_names_and_tensorboard_has_each_once(tmp_path):
    """metrics.jsonl's lasting keys (step, loss, val_loss) stay for every reader that relies on them:
    loss is the objective, val_loss the validation's plain cross-entropy; TensorBoard has no duplicate."""
    log = MetricsLog(tmp_path)
    log.log(1, objective=3.5, ce=7.5, lr=1e-4)
    log.log_validation(1, ce=7.25, objective=3.25)
    log.close()
    train, val = read_lines(tmp_path / "metrics.jsonl")
    assert (train["step"], train["loss"], train["objective"], train["ce"]) == (1, 3.5, 3.5, 7.5)
    assert (val["val_loss"], val["val_ce"], val["val_objective"]) == (7.25, 7.25, 3.25)
    tags = sorted(tag for tag, _, _ in scalars(read_tensorboard(tmp_path / "logs")))
    assert tags == ["train/ce", "train/lr", "train/objective", "val/ce", "val/objective"], tags
