"""The GPU benchmark (bench/bench_gpu.py) runs end to end on the CPU at its tiny scale: the model
built and quantized, ours and mlx_lm lora trained side by side, the table printed. A GPU is lent
only now and then; this is what keeps the script working for that day."""

from __future__ import annotations

import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_the_gpu_benchmark_runs_at_its_tiny_scale(capsys):
    import bench_gpu

    assert bench_gpu.main(["--tiny", "--models", "llama-1b", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out, out
    rows = {side: re.search(rf"^llama-tiny \(for llama-1b\): {side} +([\d.]+) +(\d+) +([\d.]+) +[\d.]+ [MGk]iB +"
                            rf"([\d.]+)x +([\d.]+)x$", out, re.MULTILINE) for side in ("ours", "mlx_lm lora")}
    assert all(rows.values()), out
    for match in rows.values():
        seconds, tokens, per_second = float(match[1]), int(match[2]), float(match[3])
        assert seconds > 0 and 0.9 * 2 * 16 <= tokens <= 2 * 16  # full batches: 2 x 16 tokens, as each side counts
        # tokens a second are tokens a step over seconds a step (printed to the millisecond)
        assert tokens / (seconds + 0.0005) - 0.05 <= per_second <= tokens / max(seconds - 0.0005, 1e-9) + 0.05
    assert rows["mlx_lm lora"][4] == "1.0" and rows["mlx_lm lora"][5] == "1.00"  # the ratios' reference
    # ours' ratio is its tokens a second over mlx_lm's
    ours, theirs = float(rows["ours"][3]), float(rows["mlx_lm lora"][3])
    assert abs(float(rows["ours"][4]) - ours / theirs) <= 0.06 + 0.01 * ours / theirs
