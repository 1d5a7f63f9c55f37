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


def spearman(x, y) -> float:
    """Spearman rank correlation of the pairs ``(x_k, y_k)`` (average ranks for ties; NaN when either
    side is constant): the one implementation every chapter and simulation uses."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("spearman needs two 1-d arrays of the same length, at least 2")
    return float(rank_correlation(rankdata(x), rankdata(y)))


def mean_lower_bounds(samples: np.ndarray, n_boot: int, rng, level: float = 0.95, chunk: int = 2 ** 24) -> np.ndarray:
    """For each row of ``samples`` (shape ``(sims, n)``), the lower end of the percentile-bootstrap
    interval of its mean that :func:`bootstrap_mean_ci` computes (``n_boot`` resamples of the row),
    vectorised over rows in chunks of about ``chunk`` drawn indices."""
    samples = np.atleast_2d(np.asarray(samples, float))
    sims, n = samples.shape
    rows = max(1, chunk // (n_boot * n))
    out = np.empty(sims)
    for start in range(0, sims, rows):
        block = samples[start:start + rows]
        idx = rng.integers(0, n, size=(len(block), n_boot, n))
        means = np.take_along_axis(block[:, None, :], idx, -1).mean(-1)
        out[start:start + rows] = np.quantile(means, (1 - level) / 2, axis=-1)
    return out


# --- Power and false-pass rate of the statistic a run actually computes ------------------------------
#
# The closed forms above model an idealised statistic. A *world* rebuilds the statistic a chapter
# computed from the run's own units — their number, their values, their measurement noise — with the
# effect set to a chosen value: the registered effect gives the power, the registered no-effect value
# the false-pass rate (a parametric bootstrap from the run's data). Its ``statistics(effect, rng, sims)``
# returns ``sims`` draws of the statistic; ``to_json()`` is saved with the check, so a test can rebuild
# the world from a recorded run (:func:`world_from_json`).

SIMULATIONS = 500   # draws per world and effect: a rate of 0.05 then has a Monte-Carlo s.e. of 0.01


class MeanWorld:
    """The 95% percentile-bootstrap lower bound of a mean over independent units (``bootstrap_mean_ci``).

    The world with standardised effect ``d`` resamples the run's ``values`` after moving their mean
    to ``d`` standard deviations: ``v − v̄ + d·s`` (``s`` the sample standard deviation). Its units
    keep the run's number, spread and shape (skew, ties, outliers)."""

    kind = "mean"

    def __init__(self, values, n_boot: int = 2000):
        self.values = np.asarray(values, float)
        if self.values.ndim != 1 or len(self.values) < 2 or not np.isfinite(self.values).all():
            raise ValueError("MeanWorld needs at least 2 finite values, one per independent unit")
        self.n, self.n_boot = len(self.values), int(n_boot)

    def statistics(self, effect: float, rng, sims: int = SIMULATIONS) -> np.ndarray:
        v = self.values
        s = v.std(ddof=1)
        centred = v - v.mean() + effect * s
        draws = centred[rng.integers(0, self.n, size=(sims, self.n))]
        return mean_lower_bounds(draws, self.n_boot, rng)

    def to_json(self) -> dict:
        return {"kind": self.kind, "values": self.values.tolist(), "n_boot": self.n_boot}


class SpearmanWorld:
    """The Spearman correlation of the units' ``(x_k, y_k)``, or the lower end of its 95%
    percentile bootstrap over units (:func:`spearman_lower_bound`, ``lower_bound=True``).

    The world with population Spearman correlation ``ρ`` keeps the run's design ``x`` and the run's
    values of ``y`` and only re-pairs them, as a random sample of units would pair them: draw ``n``
    pairs ``(u, v)`` from the bivariate normal with Pearson correlation ``r = 2 sin(πρ/6)`` (whose
    Spearman correlation is ``ρ``), give the unit with the ``i``-th smallest ``x`` the ``i``-th smallest
    ``u``, and give it the run's ``y`` value of the same rank as its ``v``. Then each unit's measurement
    noise ``se_k`` (e.g. the binomial s.e. of a held-out accuracy on ``m`` statements) is added. Without
    noise the world is the closed form's model (:func:`pass_probability`) on the run's values; the
    run's ``y`` already holds one draw of the noise, so with it the world is slightly noisier than the
    run: its power errs low, never high."""

    kind = "spearman"

    def __init__(self, x, y, se=None, lower_bound: bool = False, n_boot: int = BOOTSTRAP_RESAMPLES):
        self.x, self.y = np.asarray(x, float), np.asarray(y, float)
        if self.x.shape != self.y.shape or self.x.ndim != 1 or len(self.x) < 3:
            raise ValueError("SpearmanWorld needs x and y of the same length, at least 3 units")
        if not (np.isfinite(self.x).all() and np.isfinite(self.y).all()):
            raise ValueError("SpearmanWorld needs finite x and y")
        self.se = np.zeros_like(self.x) if se is None else np.broadcast_to(np.asarray(se, float), self.x.shape).copy()
        if (self.se < 0).any() or not np.isfinite(self.se).all():
            raise ValueError("SpearmanWorld: se must be finite and non-negative")
        self.n, self.lower_bound, self.n_boot = len(self.x), bool(lower_bound), int(n_boot)

    def statistics(self, effect: float, rng, sims: int = SIMULATIONS) -> np.ndarray:
        from scipy.stats import rankdata

        if not -1 <= effect <= 1:
            raise ValueError(f"a Spearman correlation must be in [-1, 1], not {effect}")
        r = 2 * np.sin(np.pi * effect / 6)
        u = rng.standard_normal((sims, self.n))
        v = r * u + np.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal((sims, self.n))
        v_by_u = np.take_along_axis(v, np.argsort(u, axis=1), 1)        # the v of the i-th smallest u
        rank_v = np.argsort(np.argsort(v_by_u, axis=1), axis=1)
        y = np.empty((sims, self.n))
        y[:, np.argsort(self.x, kind="stable")] = np.sort(self.y)[rank_v]
        y += self.se * rng.standard_normal((sims, self.n))
        x = np.broadcast_to(self.x, y.shape)
        if not self.lower_bound:
            return rank_correlation(rankdata(x, axis=1), rankdata(y, axis=1))
        return _bootstrap_lower_bound(x, y, rng.integers(0, self.n, size=(sims, self.n_boot, self.n)))

    def to_json(self) -> dict:
        return {"kind": self.kind, "x": self.x.tolist(), "y": self.y.tolist(), "se": self.se.tolist(),
                "lower_bound": self.lower_bound, "n_boot": self.n_boot}


class ProportionWorld:
    """The share of ``n`` independent units that succeed (or its Wald 95% lower bound), each with
    probability ``effect``: the binomial, which is exact for independent units, so the simulated rates
    equal the closed form up to Monte-Carlo error."""

    kind = "proportion"

    def __init__(self, n: int, lower_bound: bool = False):
        if int(n) < 2:
            raise ValueError("ProportionWorld needs at least 2 units")
        self.n, self.lower_bound = int(n), bool(lower_bound)

    def statistics(self, effect: float, rng, sims: int = SIMULATIONS) -> np.ndarray:
        if not 0 <= effect <= 1:
            raise ValueError(f"a proportion's effect must be in [0, 1], not {effect}")
        phat = rng.binomial(self.n, effect, size=sims) / self.n
        return phat - Z_95 * np.sqrt(phat * (1 - phat) / self.n) if self.lower_bound else phat

    def to_json(self) -> dict:
        return {"kind": self.kind, "n": self.n, "lower_bound": self.lower_bound}


WORLDS = {w.kind: w for w in (MeanWorld, SpearmanWorld, ProportionWorld)}


def world_from_json(data: dict):
    """Rebuild a world saved by its ``to_json()``; worlds defined outside this module register their
    class in :data:`WORLDS` under their ``kind``."""
    if data.get("kind") not in WORLDS:
        raise ValueError(f"unknown world {data.get('kind')!r}; known: {', '.join(WORLDS)}")
    return WORLDS[data["kind"]](**{k: v for k, v in data.items() if k != "kind"})


def simulated_pass_rate(world, effect: float, symbol: str, threshold: float, *, seed: int,
                        sims: int = SIMULATIONS) -> float:
    """The share of ``sims`` draws of ``world``'s statistic, at ``effect``, that satisfy ``symbol
    threshold`` (NaN never passes); seeded, so a registration's rates are the same at every run."""
    if symbol not in COMPARISONS:
        raise ValueError(f"unknown comparison {symbol!r}; one of {', '.join(COMPARISONS)}")
    stat = np.asarray(world.statistics(effect, np.random.default_rng(seed), sims), float)
    return float(np.mean(COMPARISONS[symbol](np.nan_to_num(stat, nan=-np.inf if symbol[0] == ">" else np.inf),
                                             threshold)))
