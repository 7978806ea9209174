import io
import json
import math

import pytest

from monitoring.progress import ProgressLine


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def postfix(line: ProgressLine) -> dict:
    """The postfix as tqdm holds it: 'loss=1.0, tok/s=3' -> {'loss': '1.0', ...}."""
    return dict(item.split("=", 1) for item in line._bar.postfix.split(", "))


def feed(line, steps, *, loss=2.0, tokens=100, seconds=0.5, memory=1_000_000_000, start=1):
    for step in range(start, start + steps):
        line.update(step, loss, tokens, seconds, memory, steps_since_checkpoint=step % 10)


def test_window_mean_skips_nan_and_keeps_only_the_last_window():
    line = ProgressLine(total_steps=100, window=3, file=io.StringIO())
    for step, loss in enumerate([10.0, 1.0, math.nan, 3.0], start=1):
        line.update(step, loss, 10, 1.0, 0, 0)
    # window holds 1.0, nan, 3.0; the 10.0 fell out; nan is left out
    assert line.smoothed_loss == pytest.approx(2.0)
    assert postfix(line)["loss_avg"] == "2.0000"
    assert postfix(line)["loss"] == "3.0000"
    line.close()


def test_smoothed_loss_is_nan_when_nothing_finite():
    line = ProgressLine(total_steps=10, file=io.StringIO())
    assert math.isnan(line.smoothed_loss)
    line.update(1, math.nan, 10, 1.0, 0, 0)
    assert math.isnan(line.smoothed_loss)
    line.close()


def test_tokens_per_second_and_eta_over_the_window():
    line = ProgressLine(total_steps=1000, window=4, file=io.StringIO())
    line.update(1, 2.0, 1000, 100.0, 0, 0)  # slow first step, falls out of the window
    for step in range(2, 6):
        line.update(step, 2.0, 300, 1.5, 0, 0)
    assert line.tokens_per_second == pytest.approx(200.0)
    # 995 remaining steps x 1.5 s = 1492.5 s
    assert line.eta_hours(5) == pytest.approx(995 * 1.5 / 3600)
    shown = postfix(line)
    assert shown["tok/s"] == "200"
    assert shown["eta_h"] == f"{995 * 1.5 / 3600:.2f}"
    line.close()


def test_checkpoint_counter_and_memory_in_mb():
    line = ProgressLine(total_steps=10, file=io.StringIO())
    line.update(1, 2.0, 10, 1.0, memory_bytes=1_234_000_000, steps_since_checkpoint=7)
    shown = postfix(line)
    assert shown["ckpt"] == "7"
    assert shown["memory_mb"] == "1234"
    assert "mem_delta" not in shown  # no baseline before the 5th update
    line.close()


def test_memory_delta_against_the_5th_update_with_warning_mark():
    line = ProgressLine(total_steps=100, file=io.StringIO())
    feed(line, 4, memory=500_000_000)  # early steps: not the baseline
    feed(line, 1, memory=1_000_000_000, start=5)  # the baseline
    assert line.memory_baseline_bytes == 1_000_000_000
    assert postfix(line)["mem_delta"] == "+0%"

    feed(line, 1, memory=1_500_000_000, start=6)
    assert postfix(line)["mem_delta"] == "+50%"  # not past +50%: no mark
    feed(line, 1, memory=1_600_000_000, start=7)
    assert postfix(line)["mem_delta"] == "+60%!"
    feed(line, 1, memory=900_000_000, start=8)
    assert postfix(line)["mem_delta"] == "-10%"
    line.close()


def test_bar_position_follows_the_step_from_the_initial_step():
    line = ProgressLine(total_steps=100, initial_step=40, file=io.StringIO())
    assert line._bar.n == 40
    feed(line, 3, start=41)
    assert line._bar.n == 43
    line.close()


def test_state_round_trip_through_json_continues_identically():
    losses = [3.0, math.nan, 2.5, 2.0, math.inf, 1.5, 1.0, 0.5]
    memory = [100, 200, 300, 400, 500, 600, 900, 700]

    def run(line, indices):
        for i in indices:
            line.update(i + 1, losses[i], 10 * (i + 1), 0.1 * (i + 1), memory[i] * 1_000_000, i)

    whole = ProgressLine(total_steps=20, window=4, file=io.StringIO())
    run(whole, range(8))

    for split in range(9):
        first = ProgressLine(total_steps=20, window=4, file=io.StringIO())
        run(first, range(split))
        saved = json.dumps(first.state_dict(), allow_nan=False)  # strict JSON
        first.close()

        resumed = ProgressLine(total_steps=20, initial_step=split, window=4, file=io.StringIO())
        resumed.load_state_dict(json.loads(saved))
        run(resumed, range(split, 8))
        assert resumed.smoothed_loss == whole.smoothed_loss
        assert resumed.tokens_per_second == whole.tokens_per_second
        assert resumed.memory_baseline_bytes == whole.memory_baseline_bytes == 500_000_000
        if split < 8:  # the postfix is drawn by an update
            assert postfix(resumed) == postfix(whole)
        resumed.close()
    whole.close()


def test_non_terminal_output_is_plain_lines_and_not_flooded():
    out = io.StringIO()
    line = ProgressLine(total_steps=2000, file=out)
    feed(line, 1000)
    line.write("validation: val_loss 1.234")
    feed(line, 500, start=1001)
    line.close()

    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first draw, the message, the last draw: 1500 steps did not give 1500 lines
    assert len(lines) <= 4
    assert "validation: val_loss 1.234" in lines
    assert "1500/2000" in lines[-1]
    for key in ("loss=", "loss_avg=", "tok/s=", "eta_h=", "ckpt=", "memory_mb=", "mem_delta="):
        assert key in lines[-1]


def test_terminal_output_redraws_in_place_and_write_prints_above():
    out = FakeTerminal()
    line = ProgressLine(total_steps=10, file=out)
    feed(line, 3)
    line.write("checkpoint saved")
    line.close()
    text = out.getvalue()
    assert "\r" in text
    assert "checkpoint saved\n" in text


def test_disabled_line_prints_nothing_but_messages():
    out = io.StringIO()
    line = ProgressLine(total_steps=10, disable=True, file=out)
    feed(line, 3)
    assert line.smoothed_loss == 2.0
    line.write("hello")
    line.close()
    assert out.getvalue() == "hello\n"
