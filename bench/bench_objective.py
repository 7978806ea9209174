"""Does the distrust objective favour primary sources, and when sources disagree, does the
trained model take the primary side? Measured on a two-kind corpus prepared by the toolkit
itself, with contested facts of its own, for several --lambda-weight values.

    python bench/bench_objective.py [--records 1400] [--steps 2000] [--lambdas 0 0.5 1] [--real-steps N] [--keep]

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
4. Trains the tiny model once per lambda (same seed, steps and data) and runs
   `python src/evaluate.py` on each run: the loss of primary minus consensus
   records, before (base) and after (adapted), how far each lambda moved that
   gap beyond what lambda 0 moved it; the share of probes where the adapted
   model prefers the primary version and the mean margin; the loss on general
   text.
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
            *extra: str) -> dict:
    """Train `model` once per lambda (same seed, steps and data) and evaluate each run: {lambda: figures}."""
    results = {}
    name = "tiny" if model == "tiny" else "real"
    for lam in lambdas:
        out = scratch / f"{name}-lambda-{lam:g}"
        run([sys.executable, str(SRC / "train_qlora.py"), "--model", model, "--data-dir", str(data),
             "--output-dir", str(out), "--max-steps", str(steps), "--learning-rate", str(learning_rate),
             "--warmup-steps", "10", "--eval-steps", str(steps), "--checkpoint-interval", str(steps),
             "--lambda-weight", str(lam), "--no-tensorboard", "--fresh", *extra], scratch / f"train-{name}-{lam:g}.log")
        print(f"trained {name} model, lambda {lam:g}", flush=True)
        json_path = scratch / f"eval-{name}-{lam:g}.json"
        run([sys.executable, str(SRC / "evaluate.py"), "--output-dir", str(out), "--data-dir", str(data),
             "--json", str(json_path)], scratch / f"eval-{name}-{lam:g}.log")
        results[lam] = json.loads(json_path.read_text())
    return results


def print_table(title: str, results: dict) -> None:
    baseline = results.get(0.0)
    print(f"\n{title}, seed 0; validation losses in nats (plain cross-entropy per token); probes: the share "
          f"where the adapted model prefers the primary version, and the mean margin (nats)")
    print(f"{'lambda':>6}  {'val loss':>8}  {'primary':>8}  {'consensus':>9}  {'gap base':>8}  "
          f"{'gap after':>9}  {'moved':>7}  {'vs lambda 0':>11}  {'primary preferred':>17}  {'margin':>7}  "
          f"{'general':>7}  {'vs lambda 0':>11}")
    for lam, r in results.items():
        a = r["adapted"]
        beyond = f"{r['gap_moved'] - baseline['gap_moved']:+11.3f}" if baseline else f"{'-':>11}"
        probe, general = r["probes"]["adapted"], r["general"]["adapted"]["loss"]
        cost = f"{general / baseline['general']['adapted']['loss'] - 1:+11.1%}" if baseline else f"{'-':>11}"
        print(f"{lam:>6g}  {a['overall']['loss']:8.3f}  {a['primary']['loss']:8.3f}  "
              f"{a['consensus']['loss']:9.3f}  {r['base']['gap']:+8.3f}  {a['gap']:+9.3f}  "
              f"{r['gap_moved']:+7.3f}  {beyond}  {probe['primary_share']:17.1%}  {probe['mean_margin']:+7.2f}  "
              f"{general:7.3f}  {cost}")
    first = next(iter(results.values()))
    print(f"base model: primary preferred {first['probes']['base']['primary_share']:.1%}, margin "
          f"{first['probes']['base']['mean_margin']:+.2f}, general text {first['general']['base']['loss']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1400)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--real-steps", type=int, default=0,
                        help="where the real model is fetched (bench/real_model.py), run the same on it for N steps")
    parser.add_argument("--real-learning-rate", type=float, default=5e-5)
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

        results = measure(scratch, data, "tiny", args.steps, args.learning_rate, args.lambdas)
        print_table(f"tiny model, {args.steps} steps, lr {args.learning_rate:g}", results)

        real = gguf_path()
        if not real.is_file():
            print(f"\nthe real model is not here ({real}): python bench/real_model.py fetches it")
        elif args.real_steps == 0:
            print(f"\nthe real model is here ({real.name}); --real-steps N runs the same on it "
                  f"(about 35 s a step on two CPU cores: N steps for each of {len(args.lambdas)} lambdas)")
        else:
            results = measure(scratch, data, str(real), args.real_steps, args.real_learning_rate, args.lambdas,
                              "--max-seq-length", "64", "--batch-size", "4")
            print_table(f"{real.name}, {args.real_steps} steps of 4 at 64 tokens, lr {args.real_learning_rate:g}",
                        results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
