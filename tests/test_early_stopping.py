import json
import math

import pytest

from monitoring.early_stopping import EarlyStopping


def first_stop(stopper, calls):
    """Run a list of ("step", step, loss, grad) / ("plateau", step, loss) calls;
    return (index, reason) of the first stop, or (None, None)."""
    for i, call in enumerate(calls):
        if call[0] == "step":
            reason = stopper.check_step(*call[1:])
        else:
            reason = stopper.check_plateau(*call[1:])
        if reason is not None:
            return i, reason
    return None, None


def test_gradient_spikes_stop_exactly_after_warmup_plus_patience():
    stopper = EarlyStopping(warmup_steps=10, grad_spike_threshold=1000.0, grad_spike_patience=3)
    stops = {}
    for step in range(1, 30):
        reason = stopper.check_step(step, loss=2.0, grad_norm=2345.6)
        if reason:
            stops[step] = reason
            break
    # steps 1..10 are warmup and never count; 11, 12, 13 are the three spikes
    assert list(stops) == [13]
    assert stops[13] == "gradient norm above 1000 for 3 consecutive steps (last 2345.6 at step 13)"


def test_a_normal_step_resets_the_spike_count():
    stopper = EarlyStopping(warmup_steps=0, grad_spike_threshold=10.0, grad_spike_patience=3)
    norms = [50, 50, 1, 50, 50, 1, 50, 50, 50]
    reasons = [stopper.check_step(step, 1.0, norm) for step, norm in enumerate(norms, start=1)]
    assert reasons[:8] == [None] * 8
    assert reasons[8] is not None and "at step 9" in reasons[8]


def test_norm_equal_to_threshold_is_not_a_spike():
    stopper = EarlyStopping(warmup_steps=0, grad_spike_threshold=10.0, grad_spike_patience=1)
    assert stopper.check_step(1, 1.0, 10.0) is None
    assert stopper.check_step(2, 1.0, 10.01) is not None


@pytest.mark.parametrize("loss, grad, word", [
    (math.nan, 1.0, "loss (nan)"),
    (math.inf, 1.0, "loss (inf)"),
    (-math.inf, 1.0, "loss (-inf)"),
    (1.0, math.nan, "gradient norm (nan)"),
    (1.0, math.inf, "gradient norm (inf)"),
])
def test_non_finite_stops_at_once_even_in_warmup_and_with_plateau_off(loss, grad, word):
    stopper = EarlyStopping(warmup_steps=50, plateau_enabled=False)
    assert stopper.check_step(36, 1.0, 1.0) is None
    reason = stopper.check_step(37, loss, grad)
    assert reason == f"non-finite {word} at step 37: stopped before the update"


def test_plateau_with_huge_min_delta_stops_after_patience_checks_after_warmup():
    stopper = EarlyStopping(patience=3, min_delta=1e9, warmup_steps=100)
    reasons = {step: stopper.check_plateau(step, 2.345) for step in range(50, 501, 50)}
    # 50, 100: warmup, ignored. 150 sets the best; 200, 250, 300 do not improve.
    assert [s for s, r in reasons.items() if r] == [300, 350, 400, 450, 500]
    assert reasons[300] == (
        "plateau: smoothed training loss has not improved by 1e+09 for 3 checks "
        "(best 2.345 at step 150)"
    )


def test_plateau_improvement_must_exceed_min_delta_and_resets_the_count():
    stopper = EarlyStopping(patience=2, min_delta=0.1, warmup_steps=0)
    assert stopper.check_plateau(1, 3.0) is None  # best 3.0
    assert stopper.check_plateau(2, 2.95) is None  # too small: 1 check
    assert stopper.check_plateau(3, 2.5) is None  # improvement: reset, best 2.5
    assert stopper.best_loss == 2.5 and stopper.best_step == 3
    assert stopper.check_plateau(4, 2.45) is None
    reason = stopper.check_plateau(5, 2.41)
    assert reason == (
        "plateau: smoothed training loss has not improved by 0.1 for 2 checks "
        "(best 2.500 at step 3)"
    )


def test_nan_smoothed_loss_never_becomes_best():
    stopper = EarlyStopping(patience=2, min_delta=0.0, warmup_steps=0)
    assert stopper.check_plateau(1, math.nan) is None
    assert stopper.best_step is None and stopper.best_loss == math.inf
    assert stopper.check_plateau(2, 2.0) is None
    assert stopper.check_plateau(3, math.nan) is None
    assert stopper.best_loss == 2.0
    assert "best 2.000 at step 2" in stopper.check_plateau(4, math.nan)


def test_all_nan_plateau_still_gives_a_readable_reason():
    stopper = EarlyStopping(patience=2, warmup_steps=0)
    stopper.check_plateau(1, math.nan)
    assert stopper.check_plateau(2, math.nan).endswith("(no finite loss yet)")


def test_plateau_disabled_never_stops():
    stopper = EarlyStopping(patience=1, min_delta=1e9, warmup_steps=0, plateau_enabled=False)
    assert all(stopper.check_plateau(step, 5.0) is None for step in range(1, 20))


def _mixed_calls():
    """A run with warmup, spikes broken by normal steps, NaN and flat losses:
    every counter moves at some point, and it ends with a spike stop."""
    calls = []
    for step in range(1, 61):
        spike = step in (12, 13, 20, 21, 40, 41) or step >= 55
        calls.append(("step", step, 2.0, 5000.0 if spike else 1.0))
        if step % 5 == 0:
            smoothed = math.nan if step == 25 else 3.0 - min(step, 40) * 0.02
            calls.append(("plateau", step, smoothed))
    return calls


def _plateau_calls():
    calls = []
    for step in range(1, 61):
        calls.append(("step", step, 2.0, 1.0))
        if step % 5 == 0:
            calls.append(("plateau", step, math.nan if step == 30 else 3.0 - min(step, 25) * 0.01))
    return calls


MIXED_CALLS = _mixed_calls()


@pytest.mark.parametrize("calls", [MIXED_CALLS, _plateau_calls()], ids=["spikes", "plateau"])
def test_resume_through_json_at_every_point_stops_identically(calls):
    def make():
        return EarlyStopping(patience=4, min_delta=0.05, warmup_steps=10,
                             grad_spike_threshold=1000.0, grad_spike_patience=3)

    expected = first_stop(make(), calls)
    assert expected[1] is not None  # the sequence does stop
    assert expected[1].startswith("gradient" if calls is MIXED_CALLS else "plateau")

    for split in range(len(calls) + 1):
        before = make()
        stop_index, reason = first_stop(before, calls[:split])
        if stop_index is None:
            saved = json.dumps(before.state_dict(), allow_nan=False)  # strict JSON
            after = make()
            after.load_state_dict(json.loads(saved))
            stop_index, reason = first_stop(after, calls[split:])
            if stop_index is not None:
                stop_index += split
        assert (stop_index, reason) == expected, f"split at call {split}"


def test_state_round_trip_keeps_infinity_and_best():
    stopper = EarlyStopping()
    state = json.loads(json.dumps(stopper.state_dict(), allow_nan=False))
    assert state["best_loss"] is None  # null: no best yet
    restored = EarlyStopping()
    restored.load_state_dict(state)
    assert restored.best_loss == math.inf and restored.best_step is None


@pytest.mark.parametrize("written", [
    '{"best_loss": "inf", "losses": [2.0, "nan"]}',  # early stopping's strings, before null
    '{"best_loss": Infinity, "losses": [2.0, NaN]}',  # what Python's json wrote for bare floats
])
def test_a_state_of_an_earlier_version_still_loads(written):
    state = dict(json.loads(written), consecutive_spikes=1, best_step=None, checks_without_improvement=2)
    restored = EarlyStopping()
    restored.load_state_dict(state)
    assert restored.best_loss == math.inf and restored.checks_without_improvement == 2
    assert list(restored.losses)[0] == 2.0 and math.isnan(list(restored.losses)[1])
    assert restored.smoothed_loss == 2.0
    assert json.loads(json.dumps(restored.state_dict(), allow_nan=False))["losses"] == [2.0, None]
