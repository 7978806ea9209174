"""The Empirical Distrust objective.

Per sample i, with authority weight a_i in [0, 0.99] and provenance entropy
H_i >= 0 bits:

    d_i = alpha * (ln(1 - a_i + 1e-8) + H_i) ** 2        (Roemmele, 2025)

`reference` mode adds `lambda * mean(d_i)` to the cross-entropy, as published.
That term does not depend on the model, so its gradient is zero: it is kept
for comparison and logging, and learns exactly what plain cross-entropy learns.

`weighted` mode (the default) makes the score act: each sample's token
cross-entropy is weighted by w_i = d_i**lambda / mean_corpus(d**lambda), so
lambda = 0 is plain cross-entropy and the mean weight over the corpus is 1.
"""

from __future__ import annotations

import numpy as np

from run_safety.errors import UserError

EPSILON = 1e-8
# Records below this auth_weight are reported as primary, the others as consensus
# (the reference's scale puts primary data at 0.0-0.3, consensus at 0.85-0.99).
AUTHORITY_SPLIT = 0.5
BY_SOURCE_TYPE_SHOWN = 12  # the start line names at most this many source types


def distrust_scores(auth_weight: np.ndarray, prov_entropy: np.ndarray, alpha: float) -> np.ndarray:
    """d_i for each sample (float64, so the corpus mean is exact enough)."""
    a = np.asarray(auth_weight, dtype=np.float64)
    h = np.asarray(prov_entropy, dtype=np.float64)
    return alpha * (np.log(1.0 - a + EPSILON) + h) ** 2


def powered(scores: np.ndarray, lambda_weight: float) -> np.ndarray:
    # numpy gives 0.0 ** 0 == 1, so lambda = 0 is plain cross-entropy even
    # for samples whose score is exactly zero.
    return np.power(scores, lambda_weight)


class DistrustObjective:
    """Turns per-sample (a_i, H_i) into loss weights and the logged term.

    Built once from the training corpus (its mean of d**lambda), then asked
    per batch; it holds no model state and knows nothing of the trainer.
    """

    def __init__(self, alpha: float, lambda_weight: float, mode: str,
                 corpus_auth: np.ndarray, corpus_entropy: np.ndarray):
        if mode not in ("weighted", "reference"):
            raise ValueError(f"unknown distrust mode {mode!r}")
        self.alpha = alpha
        self.lambda_weight = lambda_weight
        self.mode = mode
        with np.errstate(over="ignore", under="ignore"):  # judged just below, in one message
            self.corpus_mean = float(np.mean(powered(distrust_scores(corpus_auth, corpus_entropy, alpha),
                                                     lambda_weight)))
        if mode == "weighted" and not (0 < self.corpus_mean < np.inf):
            raise UserError(
                f"the mean of d**lambda over the training set is {self.corpus_mean:g} (every score is 0, or "
                f"d**lambda under- or overflows at --lambda-weight {lambda_weight}), so the weights are "
                f"meaningless; use a smaller --lambda-weight or --distrust-mode reference")

    def weights(self, auth: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """Per-sample weights of the token cross-entropy (all 1 in reference mode)."""
        if self.mode == "reference":
            return np.ones(len(auth), dtype=np.float32)
        d = powered(distrust_scores(auth, entropy, self.alpha), self.lambda_weight)
        return (d / self.corpus_mean).astype(np.float32)

    def reference_term(self, auth: np.ndarray, entropy: np.ndarray) -> float:
        """lambda * mean(d_i) over the given samples: the published additive term."""
        if len(auth) == 0:
            return 0.0
        return float(self.lambda_weight * np.mean(distrust_scores(auth, entropy, self.alpha)))

    def objective(self, weighted_ce: float, plain_ce: float, auth: np.ndarray, entropy: np.ndarray) -> float:
        """The loss the run optimizes (or, in reference mode, reports)."""
        if self.mode == "reference":
            return plain_ce + self.reference_term(auth, entropy)
        return weighted_ce

    def weight_report(self, auth: np.ndarray, entropy: np.ndarray, source_type_codes: np.ndarray | None = None,
                      source_type_names: list | None = None) -> dict:
        """What the objective does to a corpus: the mean loss weight of primary and
        consensus records (and of each source type), and the ratio of their mean d.

        `favours_primary` is False when primary records weigh less than consensus
        ones (judged on d itself where the weights are all 1: lambda 0 or
        reference mode), i.e. when the scores are on a scale that turns the
        objective's purpose around.
        """
        auth = np.asarray(auth)
        weights = self.weights(auth, entropy).astype(np.float64)
        d = distrust_scores(auth, entropy, self.alpha)
        primary = auth < AUTHORITY_SPLIT
        report = {"mode": self.mode, "lambda": self.lambda_weight, "alpha": self.alpha,
                  "primary_records": int(primary.sum()), "consensus_records": int((~primary).sum()),
                  "primary_weight": _mean(weights[primary]), "consensus_weight": _mean(weights[~primary]),
                  "primary_distrust": _mean(d[primary]), "consensus_distrust": _mean(d[~primary])}
        acts = self.mode == "weighted" and self.lambda_weight != 0
        low, high = ((report["primary_weight"], report["consensus_weight"]) if acts
                     else (report["primary_distrust"], report["consensus_distrust"]))
        report["favours_primary"] = None if low is None or high is None else bool(low >= high)
        if source_type_names:  # codes index the names; a negative code is a record without one
            codes = np.asarray(source_type_codes)
            report["by_source_type"] = {name: _mean(weights[codes == code])
                                        for code, name in sorted(enumerate(source_type_names), key=lambda cn: cn[1])
                                        if (codes == code).any()}
        return report


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def weight_report_lines(report: dict) -> list[str]:
    """The training start's line about the weights, and a warning line when primary sources weigh less."""
    def group(name):
        weight, count = report[f"{name}_weight"], report[f"{name}_records"]
        return f"{weight:.3g} over {count:,} records" if count else "no records"

    head = (f"distrust weights ({report['mode']}, lambda {report['lambda']:g}; mean loss weight 1): primary "
            f"(auth_weight < {AUTHORITY_SPLIT}) {group('primary')}, consensus {group('consensus')}")
    if report["primary_distrust"] is not None and report["consensus_distrust"]:
        head += f"; mean d primary/consensus {report['primary_distrust'] / report['consensus_distrust']:.3g}x"
    by_type = report.get("by_source_type")
    if by_type:
        ranked = sorted(by_type.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{kind} {weight:.3g}" for kind, weight in ranked[:BY_SOURCE_TYPE_SHOWN])
        more = f" (+{len(ranked) - BY_SOURCE_TYPE_SHOWN} more)" if len(ranked) > BY_SOURCE_TYPE_SHOWN else ""
        head += f"; by source_type: {shown}{more}"
    lines = [head]
    if report["favours_primary"] is False:
        lines.append(
            "WARNING: primary sources (auth_weight < 0.5) weigh less than consensus ones on these scores, so the "
            "objective favours consensus text, the opposite of its purpose; the scores are on another scale than "
            "the reference's (prov_entropy 5.5-10 for pre-1970 primary sources, 0-2 for modern consensus): rescore "
            "with python src/prepare_data.py --rescore (--explain shows each term)")
    return lines
