"""Does the distrust objective favour primary sources? Measured on a two-kind
corpus prepared by the toolkit itself, for several --lambda-weight values.

    python bench/bench_objective.py [--records 1400] [--steps 150] [--lambdas 0 0.5 1] [--keep]

1. Writes raw records of two kinds in equal numbers (dated 1850-1960 lab
   notebooks, readings, patents, field logs, letters, photograph notes; modern
   2000-2024 guidance, press statements, encyclopedia entries, textbook
   passages, fact checks) with the demo corpus's generator, another seed, and
   metadata thinned out as real data has it: half the records lose their
   `evidence` list, a third their publisher, a third their URL and citation
   count, a fifth their `source_type` (inferred from the text then).
2. Prepares them with `python src/prepare_data.py` (scoring, dedup, split).
3. Prints the mean distrust score d of primary and consensus records.
4. Trains the tiny model once per lambda (same seed, steps and data) and runs
   `python src/evaluate.py` on each run: the loss of primary minus consensus
   records, before (base) and after (adapted), and how far each lambda moved
   that gap beyond what lambda 0 moved it.
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

from distrust import AUTHORITY_SPLIT, distrust_scores  # noqa: E402
from make_demo_corpus import generate_records  # noqa: E402

ALPHA = 2.7
# The bench's own contested facts: other things, other claims, other values and towns than the
# demo's, and probes asked with other openers.
BENCH_CLAIMS = [
    ("plain", "stained", ("chapel", "Greyhaven", "had windows of"), ("abbey", "Millbrook", "was glazed with")),
    ("oak", "iron", ("toll house", "Northcote", "had a door of"), ("prison", "Cold Ashby", "was shut by gates of")),
    ("spring", "brook", ("village pond", "Dunwick", "was fed by a"), ("mill race", "Fallowmere", "drew on the")),
    ("four", "six", ("windmill", "Elmstead", "had"), ("pumping mill", "Harrowby", "turned")),  # ... sails
    ("cobbles", "flagstones", ("quay", "Kestrel Point", "was paved with"),
     ("market square", "Longmarsh", "was laid in")),
    ("Swan", "Crown", ("coaching inn", "Oakhollow", "was named the"), ("alehouse", "Alderford", "bore the sign of the")),
    ("sheep", "geese", ("village green", "Brackenhurst", "was grazed by"),
     ("common", "Ironbridge Vale", "was kept short by")),
    ("river", "road", ("old forge", "Millbrook", "stood by the"), ("smithy", "Northcote", "faced the")),
    ("widows", "sailors", ("almshouse", "Cold Ashby", "housed"), ("hospital", "Elmstead", "cared for")),
    ("brass", "copper", ("town hall clock", "Fallowmere", "had hands of"), ("weather vane", "Dunwick", "was beaten from")),
]
BENCH_OPENERS = ["Put simply, ", "So which was it? ", "For the record: ", "In a word, "]
THINNING = (  # (share of records, fields they lose)
    (0.5, ("evidence",)),
    (0.33, ("publisher",)),
    (0.33, ("url", "citation_count")),
    (0.2, ("source_type",)),
)


def write_raw(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for record in generate_records(count, seed):
            for share, fields in THINNING:
                if rng.random() < share:
                    for name in fields:
                        record.pop(name, None)
            out.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(cmd)}\n{log.read_text()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    python = sys.executable

    with scratch_dir("bench-objective-", args.keep) as scratch:
        raw, data = scratch / "raw.jsonl", scratch / "corpus"
        write_raw(raw, args.records, args.seed)
        run([python, str(SRC / "prepare_data.py"), "--input", str(raw), "--output", str(data),
             "--val-fraction", "0.15"], scratch / "prepare.log")
        train = read_jsonl(data / "train.jsonl")
        val = read_jsonl(data / "val.jsonl")
        print(f"corpus: {len(train)} train, {len(val)} val records, prepared by src/prepare_data.py "
              f"from {args.records} raw records (seed {args.seed})")
        for name, records in (("train", train), ("val", val)):
            auth = [r["auth_weight"] for r in records]
            d = distrust_scores(auth, [r["prov_entropy"] for r in records], ALPHA)
            primary = [a < AUTHORITY_SPLIT for a in auth]
            d_primary = d[primary].mean()
            d_consensus = d[[not p for p in primary]].mean()
            print(f"{name:5}: mean d primary {d_primary:7.1f} ({sum(primary)} records), consensus "
                  f"{d_consensus:6.1f} ({len(primary) - sum(primary)}): ratio {d_primary / d_consensus:.1f}x")

        results = {}
        for lam in args.lambdas:
            out = scratch / f"lambda-{lam:g}"
            run([python, str(SRC / "train_qlora.py"), "--model", "tiny", "--data-dir", str(data),
                 "--output-dir", str(out), "--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate),
                 "--warmup-steps", "10", "--eval-steps", str(args.steps), "--checkpoint-interval", str(args.steps),
                 "--lambda-weight", str(lam), "--no-tensorboard", "--fresh"], scratch / f"train-{lam:g}.log")
            json_path = scratch / f"eval-{lam:g}.json"
            run([python, str(SRC / "evaluate.py"), "--output-dir", str(out), "--data-dir", str(data),
                 "--json", str(json_path)], scratch / f"eval-{lam:g}.log")
            results[lam] = json.loads(json_path.read_text())

        baseline = results.get(0.0)
        print(f"\ntiny model, {args.steps} steps, lr {args.learning_rate:g}, seed 0; validation losses in nats "
              f"(plain cross-entropy per token)")
        print(f"{'lambda':>6}  {'val loss':>8}  {'primary':>8}  {'consensus':>9}  {'gap base':>8}  "
              f"{'gap after':>9}  {'moved':>7}  {'vs lambda 0':>11}")
        for lam, r in results.items():
            a = r["adapted"]
            beyond = f"{r['gap_moved'] - baseline['gap_moved']:+11.3f}" if baseline else f"{'-':>11}"
            print(f"{lam:>6g}  {a['overall']['loss']:8.3f}  {a['primary']['loss']:8.3f}  "
                  f"{a['consensus']['loss']:9.3f}  {r['base']['gap']:+8.3f}  {a['gap']:+9.3f}  "
                  f"{r['gap_moved']:+7.3f}  {beyond}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
