"""Load a base model, quantize it, attach LoRA: mlx-lm does the work.

A base that is not quantized is quantized once, the way `mlx_lm convert -q`
does it, into an ordinary mlx-lm model directory in the cache
(`.cache/quantized/`, keyed by the base's files, bits and group size); training
loads that directory, and a run's adapter_config.json names it. So
`mlx_lm.load(adapter_config["model"], adapter_path=RUN)` is exactly the model
that was trained, not the unquantized base the adapters never saw.
`run_base_model` finds that base again for a finished run (export, generate,
evaluate), rebuilding the quantized copy, or the tiny model, when the project
has moved.

Also builds `tiny`, the demo model: a small Llama with a byte-level BPE
tokenizer trained on the demo corpus, written once as an ordinary mlx-lm model
directory (so `mlx_lm.load` and `mlx_lm generate` take it like any other).
"""
