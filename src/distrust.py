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

from errors import UserError

EPSILON = 1e-8


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
