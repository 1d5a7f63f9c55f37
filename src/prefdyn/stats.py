"""Uncertainty for the book's measurements: percentile bootstrap intervals."""
from __future__ import annotations

import functools

import numpy as np


def bootstrap_mean_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap interval (resampling the values with replacement).

    For a paired comparison pass the per-item differences, e.g. accuracy after minus before on
    the same held-out statements: resampling items keeps each pair together.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("bootstrap_mean_ci needs a non-empty 1-d array")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


# --- Operating characteristics of a registered prediction -------------------------------------------
#
# A prediction passes when a statistic of ``n`` measurements clears a threshold. Its *power* is the
# probability that it passes if the effect is as large as registered; its *false-pass rate* the
# probability that it passes if there is no effect (the registered null). Each family below models
# the statistic the chapters compute; the closed forms are exact for their model, the simulations
# seeded, so a registration's numbers never change between runs.

BOOTSTRAP_RESAMPLES = 200   # resamples of each percentile bootstrap modelled here
COMPARISONS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less}
Z_95 = 1.959963984540054  # the two-sided 95% normal quantile, as in the bootstrap intervals


def _proportion(n: int, p: float, symbol: str, threshold: float, lower_bound: bool) -> float:
    """Exact: k ~ Binomial(n, p); the statistic is k/n, or its Wald 95% lower bound."""
    from scipy.stats import binom

    k = np.arange(n + 1)
    phat = k / n
    stat = phat - Z_95 * np.sqrt(phat * (1 - phat) / n) if lower_bound else phat
    return float(binom.pmf(k, n, p)[COMPARISONS[symbol](stat, threshold)].sum())


def _mean_lower_bound(n: int, d: float, symbol: str, threshold: float) -> float:
    """Exact for normal data: n paired differences ~ N(d, 1) (``d`` standardised); the statistic is
    the 95% lower bound x̄ − z·s/√n, which clears ``threshold`` (in standard deviations; ``>`` or
    ``>=``) iff the t statistic √n(x̄ − threshold)/s exceeds z: a noncentral-t tail."""
    from scipy.stats import nct

    if symbol not in (">", ">="):
        raise ValueError("a lower bound is compared with '>' or '>='")
    return float(nct.sf(Z_95, n - 1, (d - threshold) * np.sqrt(n)))


def _spearman_sample(n: int, rho_s: float, sims: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``sims`` samples of n pairs from the bivariate normal whose Spearman correlation is ``rho_s``
    (Pearson r = 2·sin(π·ρ_s/6)), as ranks."""
    from scipy.stats import rankdata

    r = 2 * np.sin(np.pi * rho_s / 6)
    x = rng.standard_normal((sims, n))
    y = r * x + np.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal((sims, n))
    return rankdata(x, axis=1), rankdata(y, axis=1)


def rank_correlation(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis (Pearson correlation of ranks)."""
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(-1) / np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))


def _spearman(n: int, rho_s: float, symbol: str, threshold: float, lower_bound: bool,
              sims: int, seed: int) -> float:
    """Simulated: the Spearman correlation of n pairs, or its 95% percentile-bootstrap lower bound
    over the pairs (resampled with replacement, 200 resamples each), against ``threshold``."""
    rng = np.random.default_rng(seed)
    sims = sims // 2 if lower_bound else sims  # the bootstrap costs 200 resamples a simulation
    rx, ry = _spearman_sample(n, rho_s, sims, rng)
    if not lower_bound:
        stat = rank_correlation(rx, ry)
    else:
        stat = _bootstrap_lower_bound(rx, ry, rng.integers(0, n, size=(sims, BOOTSTRAP_RESAMPLES, n)))
    return float(np.mean(COMPARISONS[symbol](np.nan_to_num(stat, nan=-np.inf if symbol[0] == ">" else np.inf),
                                             threshold)))


def _bootstrap_lower_bound(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The 2.5% quantile of the Spearman correlation of the pairs ``(x, y)`` (last axis, length n)
    over the resamples ``idx`` (shape ``(..., B, n)``); resamples whose ranks are all tied are left out."""
    from scipy.stats import rankdata

    def resampled(v):
        return rankdata(np.take_along_axis(np.broadcast_to(v[..., None, :], idx.shape), idx, -1), axis=-1)

    return np.nanquantile(rank_correlation(resampled(x), resampled(y)), 0.025, axis=-1)


def spearman_lower_bound(x, y, seed: int, n_boot: int = BOOTSTRAP_RESAMPLES) -> float:
    """Lower end of the 95% percentile-bootstrap interval of the Spearman correlation of the pairs
    ``(x_k, y_k)``, resampling the pairs (the units, e.g. behaviours) with replacement ``n_boot``
    times from ``np.random.default_rng(seed)``: the statistic that the ``spearman_lower_bound`` test
    of :func:`pass_probability` models. Ties from repeated units get average ranks; a resample whose
    ranks are all tied has no correlation and is left out."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("spearman_lower_bound needs two 1-d arrays of the same length, at least 2")
    return float(_bootstrap_lower_bound(x, y, np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))))


TESTS = ("proportion", "proportion_lower_bound", "mean_lower_bound", "spearman", "spearman_lower_bound")


@functools.lru_cache(maxsize=None)
def pass_probability(test: str, n: int, effect: float, symbol: str, threshold: float, *,
                     sims: int = 1000, seed: int = 0) -> float:
    """P(the statistic of ``test`` on ``n`` measurements satisfies ``symbol threshold``) when the
    true effect is ``effect``:

    * ``proportion``: the fraction of n independent successes, each with probability ``effect``;
    * ``proportion_lower_bound``: its Wald 95% lower bound p̂ − z√(p̂(1−p̂)/n);
    * ``mean_lower_bound``: the 95% lower bound of the mean of n paired differences whose mean is
      ``effect`` standard deviations (``threshold`` in the same units);
    * ``spearman``: the Spearman correlation of n pairs whose population Spearman correlation is
      ``effect``; ``spearman_lower_bound``: its 95% percentile-bootstrap lower bound.
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; one of {', '.join(TESTS)}")
    if symbol not in COMPARISONS:
        raise ValueError(f"unknown comparison {symbol!r}; one of {', '.join(COMPARISONS)}")
    if int(n) < 2:
        raise ValueError(f"n = {n}: a prediction needs at least 2 measurements")
    n = int(n)
    if test.startswith("proportion"):
        if not 0 <= effect <= 1:
            raise ValueError(f"a proportion's effect must be in [0, 1], not {effect}")
        return _proportion(n, effect, symbol, threshold, test.endswith("lower_bound"))
    if test == "mean_lower_bound":
        return _mean_lower_bound(n, effect, symbol, threshold)
    if not -1 <= effect <= 1:
        raise ValueError(f"a Spearman correlation must be in [-1, 1], not {effect}")
    return _spearman(n, effect, symbol, threshold, test.endswith("lower_bound"), sims, seed)
