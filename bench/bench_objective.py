"""Does the distrust objective favour primary sources, and when sources disagree, does the
trained model take the primary side? Measured on a two-kind corpus prepared by the toolkit
itself, with contested facts of its own, for several --lambda-weight values; and, with
--real-steps N, on the real model (SmolLM2-135M-Instruct) on that corpus and on the demo's.

    python bench/bench_objective.py [--records 1400] [--steps 2000] [--lambdas 0 0.5 1]
                                    [--real-steps N [--real-learning-rate 1e-4] [--real-train-args "..."]]
                                    [--keep]

1. Writes raw records of two kinds in equal numbers (dated 1850-1960 lab
   notebooks, readings, patents, field logs, letters, photograph notes; modern
   2000-2024 guidance, press statements, encyclopedia entries, textbook
   passages, fact checks) with the demo corpus's generator, another seed, and
   metadata thinned out as real data has it: half the records lose their
   `evidence` list, a third their publisher, a third their URL and citation
   count, a fifth their `source_type` (inferred from the text then). Among
   them, the contested facts of BENCH_CLAIMS (other things, claims, values and
   towns than the demo's), each stated by primary and consensus records equally
   often; a probe file asks each with other openers than the demo's.
2. Prepares them with `python src/prepare_data.py` (scoring, dedup, split),
   and writes probes.jsonl and general.jsonl beside the prepared corpus.
3. Prints the mean distrust score d of primary and consensus records.
4. Trains the tiny model once per lambda (same seed, steps and data; --steps 0
   skips it) and runs `python src/evaluate.py` on each run: the loss of primary
   minus consensus records, before (base) and after (adapted), how far each
   lambda moved that gap beyond what lambda 0 moved it; the share of probes where
   the adapted model prefers the primary version and the mean margin; the loss
   on general text.
5. With --real-steps N: SmolLM2-135M-Instruct from its GGUF (bench/real_model.py),
   N steps at each lambda on the demo corpus (data/) and on this corpus, each run
   evaluated (src/evaluate.py, the first REAL_EVAL_BATCHES batches of the val file
   and of the general text); for each: how many probes prefer the primary
   version ("n of N", as plain text, the form these records teach and so the
   headline; in the chat template beside it; by set for the demo's two sets), the mean margin summed
   and per token, the general text's loss against lambda 0's and the base's, and
   whether the trained model still answers "What is the capital of France?" with
   Paris, asked in its chat template (src/generate.py --prompt-format chat). The
   settings (REAL_SETTINGS) and why are given there.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from common import REPO, SRC, scratch_dir

sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(SRC))

from training.distrust import AUTHORITY_SPLIT, distrust_scores  # noqa: E402
from real_model import gguf_path  # noqa: E402
from make_demo_corpus import contested_facts, general_texts, generate_records, probes, write_jsonl  # noqa: E402

ALPHA = 2.7
# The bench's own contested facts: other things, other claims, other values and towns than the
# demo's, and probes asked with other openers.
BENCH_CLAIMS = [  # the two values of a pair are as many tokens of the tiny model's vocabulary
    ("plain", "iron", ("chapel", "Greyhaven", "had windows of"), ("abbey", "Millbrook", "had gates of")),
    ("oak", "tin", ("toll house", "Northcote", "had a door of"), ("prison", "Cold Ashby", "was shut by gates of")),
    ("well", "river", ("village pond", "Dunwick", "was fed by the"), ("mill race", "Fallowmere", "drew on the")),
    ("three", "four", ("windmill", "Elmstead", "had"), ("pumping mill", "Harrowby", "turned")),  # ... sails
    ("stone", "sand", ("quay", "Kestrel Point", "was paved with"), ("market square", "Longmarsh", "was laid in")),
    ("Bell", "Star", ("coaching inn", "Oakhollow", "was named the"), ("alehouse", "Alderford", "bore the sign of the")),
    ("sheep", "cows", ("village green", "Brackenhurst", "was grazed by"),
     ("common", "Ironbridge Vale", "was kept short by")),
    ("clay", "road", ("old forge", "Millbrook", "stood on a"), ("smithy", "Northcote", "faced the")),
    ("widows", "sailors", ("almshouse", "Cold Ashby", "housed"), ("hospital", "Elmstead", "cared for")),
    ("gold", "coal", ("merchant's house", "Fallowmere", "was built with"), ("railway", "Dunwick", "carried")),
]
BENCH_OPENERS = ["Put simply, ", "So which was it? ", "For the record: ", "In a word, "]
# The real model's settings: what a careful user would choose for a 135M instruct model and a
# run of a few hundred steps of 4 x 64 tokens.
# - LoRA rank 8, alpha 16 (scale 2), on every linear layer of the last 16 blocks (mlx_lm lora's
#   own default, num_layers 16): rank 8 is plenty for a few dozen facts, and the first 14 blocks,
#   left alone, keep more of what the model knows.
# - Learning rate 1e-4 (--real-learning-rate), warmup 5% of the run (at least 10 steps), then
#   cosine decay to 0 (the toolkit's schedule); 500 steps (--real-steps), about one epoch of the
#   bench's corpus. Measured on the demo corpus: 2e-4 on all 30 blocks for 250 steps learns the
#   facts as fast but costs the capital answer at both lambdas; 5e-5 for 250 steps learns nothing
#   the probes see.
# - 64 tokens a sequence: every contested claim of both corpora ends within 56 SmolLM2 tokens of
#   its record's start (the median record is 57 tokens), so no fact is cut off; batch 4.
# - Validated and checkpointed once, at the end; the probes are not scored by the run
#   (--probes off): evaluate.py scores them, in both forms, for the base and the adapted model.
REAL_SETTINGS = ["--batch-size", "4", "--max-seq-length", "64", "--lora-rank", "8", "--lora-alpha", "16",
                 "--lora-layers", "16", "--val-batches", "8", "--no-early-stopping", "--probes", "off"]
REAL_EVAL_BATCHES = 8  # evaluate.py --max-batches: 32 val records and 32 passages of general text
CAPITAL_QUESTION, CAPITAL = "What is the capital of France?", "Paris"
THINNING = (  # (share of records, fields they lose)
    (0.5, ("evidence",)),
    (0.33, ("publisher",)),
    (0.33, ("url", "citation_count")),
    (0.2, ("source_type",)),
)


def write_raw(path: Path, count: int, seed: int, facts: list[dict]) -> list[dict]:
    """The raw records, thinned, written to `path` and returned."""
    rng = random.Random(seed)
    records = []
    with open(path, "w", encoding="utf-8") as out:
        for record in generate_records(count, seed, facts):
            records.append(record)
            for share, fields in THINNING:
                if rng.random() < share:
                    for name in fields:
                        record.pop(name, None)
            out.write(json.dumps(record) + "\n")
    return records


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(cmd)}\n{log.read_text()[-2000:]}")


def measure(scratch: Path, data: Path, model: str, steps: int, learning_rate: float, lambdas: list[float],
            *extra: str, name: str = "", warmup: int = 10, max_batches: int | None = None) -> dict:
    """Train `model` once per lambda (same seed, steps and data) and evaluate each run: {lambda: figures}."""
    results = {}
    name = name or ("tiny" if model == "tiny" else "real")
    for lam in lambdas:
        out = scratch / f"{name}-lambda-{lam:g}"
        run([sys.executable, str(SRC / "train_qlora.py"), "--model", model, "--data-dir", str(data),
             "--output-dir", str(out), "--max-steps", str(steps), "--learning-rate", str(learning_rate),
             "--warmup-steps", str(warmup), "--eval-steps", str(steps), "--checkpoint-interval", str(steps),
             "--lambda-weight", str(lam), "--no-tensorboard", "--fresh", *extra], scratch / f"train-{name}-{lam:g}.log")
        print(f"trained {name} model, lambda {lam:g}", flush=True)
        json_path = scratch / f"eval-{name}-{lam:g}.json"
        limit = ["--max-batches", str(max_batches)] if max_batches else []
        run([sys.executable, str(SRC / "evaluate.py"), "--output-dir", str(out), "--data-dir", str(data),
             "--json", str(json_path), *limit], scratch / f"eval-{name}-{lam:g}.log")
        results[lam] = json.loads(json_path.read_text())
        results[lam]["run"] = str(out)
    return results


def capital_answer(run_dir: Path, log: Path) -> str:
    """The trained model's answer to CAPITAL_QUESTION, asked in its chat template, greedy (its stderr to `log`)."""
    command = [sys.executable, str(SRC / "generate.py"), "--output-dir", str(run_dir), "--prompt", CAPITAL_QUESTION,
               "--prompt-format", "chat", "--max-tokens", "24"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    log.write_text(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"exit {result.returncode}: {' '.join(command)}\n{result.stderr[-2000:]}")
    return " ".join(result.stdout.split())


def per_token_margin(report: dict) -> float:
    """Mean over the probes of primary minus consensus log-prob per token (nats a token)."""
    probes = report["per_probe"]
    return sum(p["primary"]["per_token"] - p["consensus"]["per_token"] for p in probes) / len(probes)


def primary_count(report: dict) -> str:
    probes = report["per_probe"]
    return f"{sum(p['prefers'] == 'primary' for p in probes)} of {len(probes)}"


def set_count(figures: dict) -> str:
    return f"{round(figures['primary_share'] * figures['count'])} of {figures['count']}"


def print_real_table(title: str, results: dict, answers: dict) -> None:
    """The real model's figures: per lambda, each probe form (headline first) and set."""
    first = next(iter(results.values()))
    forms = list(first["probes"]["by_form"])
    baseline = results.get(0.0)
    base_general = first["general"]["base"]["loss"]
    print(f"\n{title}; probes: how many prefer the primary version, the mean margin (primary minus consensus "
          f"log-prob, nats) summed and per token; headline: the {forms[0]} form")
    print(f"{'lambda':>6}  {'form':5}  {'primary':>9}  {'margin':>7}  {'/token':>7}  {'by set':34}  "
          f"{'general':>7}  {'vs lambda 0':>11}  {'vs base':>8}  capital question")
    rows = [("base", first, "base")] + [(f"{lam:g}", r, "adapted") for lam, r in results.items()]
    for label, r, which in rows:
        for i, form in enumerate(forms):
            report = r["probes"]["by_form"][form][which]
            sets = "  ".join(f"{name} {set_count(one)}" for name, one in report.get("by_set", {}).items())
            general = r["general"][which]["loss"]
            if i == 0:
                vs0 = f"{general / baseline['general']['adapted']['loss'] - 1:+11.1%}" \
                    if baseline and which == "adapted" else f"{'-':>11}"
                answer = answers.get(label, "") if which == "adapted" else ""
                tail = (f"{general:7.3f}  {vs0}  {general / base_general - 1:+8.1%}  "
                        f"{'Paris' if CAPITAL in answer else 'NOT Paris'}: {answer[:60]!r}" if answer else
                        f"{general:7.3f}  {vs0}  {general / base_general - 1:+8.1%}")
            else:
                tail = ""
            print(f"{label if i == 0 else '':>6}  {form:5}  {primary_count(report):>9}  {report['mean_margin']:+7.2f}  "
                  f"{per_token_margin(report):+7.2f}  {sets:34}  {tail}".rstrip())


def print_table(title: str, results: dict) -> None:
    baseline = results.get(0.0)
    print(f"\n{title}, seed 0; validation losses in nats (plain cross-entropy per token); probes, asked as plain "
          f"text (the tiny model never saw its chat template): the share where the adapted model prefers the "
          f"primary version, and the mean margin (nats)")
    print(f"{'lambda':>6}  {'val loss':>8}  {'primary':>8}  {'consensus':>9}  {'gap base':>8}  "
          f"{'gap after':>9}  {'moved':>7}  {'vs lambda 0':>11}  {'primary preferred':>17}  {'margin':>7}  "
          f"{'general':>7}  {'vs lambda 0':>11}")
    for lam, r in results.items():
        a = r["adapted"]
        beyond = f"{r['gap_moved'] - baseline['gap_moved']:+11.3f}" if baseline else f"{'-':>11}"
        probe, general = r["probes"]["by_form"]["text"]["adapted"], r["general"]["adapted"]["loss"]
        cost = f"{general / baseline['general']['adapted']['loss'] - 1:+11.1%}" if baseline else f"{'-':>11}"
        print(f"{lam:>6g}  {a['overall']['loss']:8.3f}  {a['primary']['loss']:8.3f}  "
              f"{a['consensus']['loss']:9.3f}  {r['base']['gap']:+8.3f}  {a['gap']:+9.3f}  "
              f"{r['gap_moved']:+7.3f}  {beyond}  {probe['primary_share']:17.1%}  {probe['mean_margin']:+7.2f}  "
              f"{general:7.3f}  {cost}")
    first = next(iter(results.values()))
    base = first["probes"]["by_form"]["text"]["base"]
    print(f"base model: primary preferred {base['primary_share']:.1%}, margin "
          f"{base['mean_margin']:+.2f}, general text {first['general']['base']['loss']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1400)
    parser.add_argument("--steps", type=int, default=2000, help="the tiny model's steps; 0 skips it")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--real-steps", type=int, default=0,
                        help="where the real model is fetched (bench/real_model.py), train it N steps at each "
                             "lambda on the demo corpus and on this one (REAL_SETTINGS)")
    parser.add_argument("--real-learning-rate", type=float, default=1e-4)
    parser.add_argument("--real-model", type=str, default=None,
                        help="another model for --real-steps (default: the real model's GGUF; 'tiny' checks the "
                             "harness in seconds)")
    parser.add_argument("--real-eval-batches", type=int, default=REAL_EVAL_BATCHES,
                        help="evaluate.py --max-batches for the real runs (default: %(default)s)")
    parser.add_argument("--real-train-args", default="",
                        help="more train_qlora.py flags for the real model's runs, in one string")
    parser.add_argument("--real-corpora", nargs="+", choices=("demo", "bench"), default=["demo", "bench"],
                        help="the corpora of the real runs (default: both; the demo corpus holds both sets of "
                             "contested facts, the bench's its own)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    with scratch_dir("bench-objective-", args.keep) as scratch:
        raw, data = scratch / "raw.jsonl", scratch / "corpus"
        facts = contested_facts(BENCH_CLAIMS)
        records = write_raw(raw, args.records, args.seed, facts)
        run([sys.executable, str(SRC / "prepare_data.py"), "--input", str(raw), "--output", str(data),
             "--val-fraction", "0.15"], scratch / "prepare.log")
        write_jsonl(data / "probes.jsonl", probes(random.Random(args.seed), facts, records, BENCH_OPENERS))
        write_jsonl(data / "general.jsonl", general_texts(random.Random(args.seed)))
        train = read_jsonl(data / "train.jsonl")
        val = read_jsonl(data / "val.jsonl")
        print(f"corpus: {len(train)} train, {len(val)} val records, prepared by src/prepare_data.py "
              f"from {args.records} raw records and {len(facts)} contested facts (seed {args.seed}); "
              f"{len(facts)} probes")
        for name, records in (("train", train), ("val", val)):
            auth = [r["auth_weight"] for r in records]
            d = distrust_scores(auth, [r["prov_entropy"] for r in records], ALPHA)
            primary = [a < AUTHORITY_SPLIT for a in auth]
            d_primary = d[primary].mean()
            d_consensus = d[[not p for p in primary]].mean()
            print(f"{name:5}: mean d primary {d_primary:7.1f} ({sum(primary)} records), consensus "
                  f"{d_consensus:6.1f} ({len(primary) - sum(primary)}): ratio {d_primary / d_consensus:.1f}x")

        if args.steps > 0:
            results = measure(scratch, data, "tiny", args.steps, args.learning_rate, args.lambdas)
            print_table(f"tiny model, {args.steps} steps, lr {args.learning_rate:g}", results)

        real = Path(args.real_model) if args.real_model else gguf_path()
        if args.real_model == "tiny" and args.real_steps:
            real_runs(scratch, real, data, args)
        elif not real.is_file():
            print(f"\nthe real model is not here ({real}): python bench/real_model.py fetches it")
        elif args.real_steps == 0:
            print(f"\nthe real model is here ({real.name}); --real-steps N runs it too")
        else:
            real_runs(scratch, real, data, args)
    return 0


def real_runs(scratch: Path, real: Path, bench_data: Path, args) -> None:
    """--real-steps: the real model at each lambda on the demo corpus and on the bench's; the tables."""
    import shlex
    import time

    steps, lr = args.real_steps, args.real_learning_rate
    warmup = max(10, steps // 20) if steps >= 20 else 0
    extra = [*REAL_SETTINGS, *shlex.split(args.real_train_args)]
    layers = [extra[i + 1] for i, word in enumerate(extra[:-1]) if word == "--lora-layers"][-1]  # the last one given
    blocks = "all blocks" if layers == "-1" else f"the last {layers} blocks"
    print(f"\nreal model: {real.name}, {steps} steps of 4 x 64 tokens, lr {lr:g}, warmup {warmup}, LoRA rank 8 "
          f"alpha 16 on {blocks}; train_qlora.py {' '.join(extra)}", flush=True)
    for name, data in (("demo", REPO / "data"), ("bench", bench_data)):
        if name not in args.real_corpora:
            continue
        started = time.perf_counter()
        results = measure(scratch, data, str(real), steps, lr, args.lambdas, *extra, name=f"real-{name}",
                          warmup=warmup, max_batches=args.real_eval_batches)
        answers = {f"{lam:g}": capital_answer(Path(r["run"]), scratch / f"capital-{name}-{lam:g}.log")
                   for lam, r in results.items()}
        corpus = "the demo corpus (data/)" if name == "demo" else "the bench's corpus"
        print_real_table(f"{real.name} on {corpus}, {steps} steps, lr {lr:g} ({time.perf_counter() - started:.0f} s "
                         f"for {len(args.lambdas)} runs with their evaluations)", results, answers)


if __name__ == "__main__":
    sys.exit(main())
