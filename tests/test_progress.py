"""The progress line: what it says, with what labels and units, drawn where and how often."""

import io
import json
import math
import re

import pytest

from monitoring.progress import ProgressLine, format_duration
from run_safety.sizes import size_text


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def feed(line, steps, *, objective=2.0, ce=1.5, tokens=100, seconds=0.5, memory=1_000_000_000, start=1):
    for step in range(start, start + steps):
        line.update(step, objective, ce, tokens, seconds, memory, steps_since_checkpoint=step % 10)


def parts(line: ProgressLine) -> list[str]:
    """The figures as drawn after the bar, one per ' | '-separated part."""
    assert line._bar.postfix == line.text
    return line.text.split(" | ")


def test_the_line_names_each_figure_with_its_unit():
    line = ProgressLine(total_steps=1000, window=4, file=io.StringIO(), memory_baseline_step=3)
    line.update(1, 6.0, 4.0, 1000, 100.0, 43_781_844, 1)  # slow first step, falls out of the window
    for step in range(2, 6):
        line.update(step, 5.0 + step, 4.0 + step / 10, 300, 1.5, 43_781_844 + 1_000_000 * (step - 3), step)
    assert parts(line) == [
        "train ce 4.350 (mean of last 4 steps, compare val_ce)",  # (4.2 + 4.3 + 4.4 + 4.5) / 4
        "objective 8.500",
        "200 tok/s",  # 1200 tokens in 6 s
        "ETA 24m",  # 995 steps x 1.5 s = 1492.5 s
        "last checkpoint 5 steps ago",
        "memory 45.8 MB (+2.0 MB since step 3)",
    ]


def test_window_means_skip_nan_and_keep_only_the_last_window():
    line = ProgressLine(total_steps=100, window=3, file=io.StringIO())
    for step, (objective, ce) in enumerate([(10.0, 9.0), (1.0, 0.5), (math.nan, math.nan), (3.0, 2.5)], start=1):
        line.update(step, objective, ce, 10, 1.0, 0, 0)
    # the window holds steps 2-4; step 1 fell out; NaN is left out
    assert line.smoothed_objective == pytest.approx(2.0)
    assert line.smoothed_ce == pytest.approx(1.5)
    assert parts(line)[:2] == ["train ce 1.500 (mean of last 3 steps, compare val_ce)", "objective 2.000"]
    line.close()


def test_means_are_nan_when_nothing_is_finite():
    line = ProgressLine(total_steps=10, file=io.StringIO())
    assert math.isnan(line.smoothed_ce) and math.isnan(line.smoothed_objective)
    line.update(1, math.nan, math.inf, 10, 1.0, 0, 0)
    assert math.isnan(line.smoothed_ce) and math.isnan(line.smoothed_objective)
    assert parts(line)[:2] == ["train ce nan (mean of last 1 step, compare val_ce)", "objective nan"]
    line.close()


@pytest.mark.parametrize("seconds, shown", [
    (0, "0s"), (45.4, "45s"), (60, "1m"), (1492.5, "24m"), (3600, "1h 00m"), (3 * 3600 + 5 * 60 + 59, "3h 05m"),
    (100 * 3600, "100h 00m"), (math.nan, "?"),
])
def test_durations_are_hours_and_minutes(seconds, shown):
    assert format_duration(seconds) == shown


@pytest.mark.parametrize("count, shown", [
    (0, "0.0 MB"), (1_000_000, "1.0 MB"), (43_781_844, "43.8 MB"), (512_000_000, "512 MB"),
    (4_523_000_000, "4.52 GB"), (-2_000_000, "-2.0 MB"),
])
def test_memory_in_mb_or_gb_as_it_grows(count, shown):
    assert size_text(count, smallest="MB") == shown


def test_memory_growth_is_measured_from_the_baseline_step_and_marked_only_when_large():
    line = ProgressLine(total_steps=100, file=io.StringIO(), memory_baseline_step=6)
    feed(line, 5, memory=500_000_000)  # before the baseline step: no growth shown
    assert parts(line)[-1] == "memory 500 MB"
    feed(line, 1, memory=1_000_000_000, start=6)  # the baseline
    assert parts(line)[-1] == "memory 1.00 GB (+0.0 MB since step 6)"
    feed(line, 1, memory=1_500_000_000, start=7)
    assert parts(line)[-1] == "memory 1.50 GB (+500 MB since step 6)"  # +50%: not past it
    feed(line, 1, memory=1_600_000_000, start=8)
    assert parts(line)[-1] == "memory 1.60 GB (+600 MB since step 6: growing)"
    feed(line, 1, memory=900_000_000, start=9)
    assert parts(line)[-1] == "memory 900 MB (-100 MB since step 6)"
    line.close()


def test_a_small_growth_of_a_small_model_is_no_alarm():
    line = ProgressLine(total_steps=100, file=io.StringIO(), memory_baseline_step=1)
    feed(line, 1, memory=1_000_000)
    feed(line, 1, memory=2_000_000, start=2)  # +100%, but 1 MB
    assert parts(line)[-1] == "memory 2.0 MB (+1.0 MB since step 1)"
    line.close()


def test_bar_position_follows_the_step_from_the_initial_step():
    line = ProgressLine(total_steps=100, initial_step=40, file=io.StringIO())
    assert line._bar.n == 40
    feed(line, 3, start=41)
    assert line._bar.n == 43
    line.close()


def test_state_round_trip_through_json_continues_identically():
    objectives = [3.0, math.nan, 2.5, 2.0, math.inf, 1.5, 1.0, 0.5]

    def run(line, indices):
        for i in indices:
            line.update(i + 1, objectives[i], objectives[i] / 2, 10 * (i + 1), 0.1 * (i + 1), 10**6, i)

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
        assert resumed.smoothed_objective == whole.smoothed_objective
        assert resumed.smoothed_ce == whole.smoothed_ce
        assert resumed.tokens_per_second == whole.tokens_per_second
        if split < 8:  # the figures are drawn by an update; memory is each process's own
            assert parts(resumed)[:-1] == parts(whole)[:-1]
        resumed.close()
    whole.close()


def test_a_state_written_before_the_cross_entropy_window_loads():
    line = ProgressLine(total_steps=20, window=4, file=io.StringIO())
    line.load_state_dict({"losses": [2.0, "nan"], "tokens": [10, 10], "seconds": [1.0, 1.0], "updates_seen": 2,
                          "memory_baseline_bytes": 123})
    assert line.smoothed_objective == 2.0 and math.isnan(line.smoothed_ce)
    assert line.memory_baseline_bytes is None  # another process's memory: not a baseline for this one


def test_non_terminal_output_is_plain_lines_and_not_flooded():
    out = io.StringIO()
    line = ProgressLine(total_steps=2000, file=out, memory_baseline_step=5)
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
    last = lines[-1]
    assert re.fullmatch(r" 75%\|[#0-9]+ *\| step 1500/2000 \[\d\d:\d\d elapsed, (.*)\]", last), last
    assert last.endswith(", train ce 1.500 (mean of last 50 steps, compare val_ce) | objective 2.000 | "
                         "200 tok/s | ETA 4m | last checkpoint 0 steps ago | memory 1.00 GB (+0.0 MB since step 5)]")


def test_terminal_output_redraws_in_place_and_write_prints_above():
    out = FakeTerminal()
    line = ProgressLine(total_steps=10, file=out)
    feed(line, 3)
    line.write("checkpoint saved")
    line.close()
    text = out.getvalue()
    draws = [draw for draw in text.split("\r") if "step 3/10" in draw]
    assert draws, text
    assert "train ce 1.500 (mean of last 3 steps, compare val_ce) | objective 2.000 | 200 tok/s" in draws[-1]
    assert "checkpoint saved\n" in text
    # tqdm's own remaining-time estimate is not drawn beside ours
    assert "<" not in text.replace("\r", "")


def test_disabled_line_prints_nothing_but_messages():
    out = io.StringIO()
    line = ProgressLine(total_steps=10, disable=True, file=out)
    feed(line, 3)
    assert line.smoothed_objective == 2.0
    line.write("hello")
    line.close()
    assert out.getvalue() == "hello\n"
