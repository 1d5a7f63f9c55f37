"""Multi-attribute score tables for chapter 4's reproduction of the paper's experiment: a generator of
HelpSteer-like tables (:func:`generate_scores`) and a loader for a reader's own CSV
(:func:`load_scores`, e.g. NVIDIA HelpSteer exported with its columns).

Chen, He, Jordan & Yao (2602.12180) build preference matrices from HelpSteer, whose responses carry
five human scores from 0 to 4 (helpfulness, correctness, coherence, complexity, verbosity), four
responses per prompt. HelpSteer cannot be read by the book's runs, so the chapter generates tables
of the same shape: for each prompt and response a latent Gaussian vector ``z`` over the attributes,

    z = sqrt(prompt_share) u_prompt + sqrt(1 - prompt_share) e_response,   u, e ~ N(0, R),

so that ``R`` is the correlation between attributes (of the latent scores) and ``prompt_share`` the
share of a latent's variance that the responses to one prompt have in common; each latent is cut
into the scores 0-4 at the normal quantiles of ``level_probabilities`` (so each attribute's scores
have exactly those marginal probabilities). The defaults are the book's own choice, shaped like what
is said of HelpSteer (coherence mostly high, complexity and verbosity mostly low, helpfulness close
to correctness), with the attributes' agreement and the within-prompt share set so that the paper's
construction gives the shares of cyclic and strongly transitive matrices the paper reports; they are
not HelpSteer's statistics, which were not read.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
LEVELS = 5                                    # scores 0, 1, 2, 3, 4

# correlation between the latent attribute scores, in the order of ATTRIBUTES (the book's choice)
ATTRIBUTE_CORRELATION = np.array([
    [1.00, 0.85, 0.60, 0.20, 0.10],
    [0.85, 1.00, 0.55, 0.20, 0.10],
    [0.60, 0.55, 1.00, 0.10, 0.00],
    [0.20, 0.20, 0.10, 1.00, 0.60],
    [0.10, 0.10, 0.00, 0.60, 1.00],
])
# probabilities of the scores 0, 1, 2, 3, 4 of each attribute (the book's choice)
SCORE_PROBABILITIES = {"helpfulness": (0.05, 0.10, 0.20, 0.35, 0.30),
                       "correctness": (0.05, 0.10, 0.20, 0.35, 0.30),
                       "coherence": (0.02, 0.03, 0.10, 0.30, 0.55),
                       "complexity": (0.05, 0.45, 0.40, 0.08, 0.02),
                       "verbosity": (0.05, 0.35, 0.40, 0.15, 0.05)}
DEFAULT_LEVEL_PROBABILITIES = np.array([SCORE_PROBABILITIES[a] for a in ATTRIBUTES])
# How much the attributes agree and how alike a prompt's responses are set the shares of cyclic and
# strongly transitive matrices that the paper's construction gives. The defaults mix the correlation
# above with full agreement, (1 - 0.45) ATTRIBUTE_CORRELATION + 0.45, and share half the variance
# within a prompt: on tables of 8,833 prompts (seeds 1 and 2) they give 1.4% cyclic and 57% strongly
# transitive matrices, the shares the paper reports for HelpSteer (118 and 4,924 of about 8,800
# prompts, 1.3% and 56%). One knob alone cannot match both: more alike responses lower the first
# share and raise the second together, but not in the paper's proportion.
ATTRIBUTE_AGREEMENT = 0.45
DEFAULT_CORRELATION = (1 - ATTRIBUTE_AGREEMENT) * ATTRIBUTE_CORRELATION + ATTRIBUTE_AGREEMENT
DEFAULT_PROMPT_SHARE = 0.5


@dataclass(frozen=True)
class ScoreTable:
    """``K`` scored responses for each of ``len(prompts)`` prompts: ``scores[p, r, a]`` is the score
    (0-4) of response ``r`` to prompt ``p`` on attribute ``attributes[a]``. ``source`` says where the
    table came from; ``dropped`` counts the prompts left out for having fewer than ``K`` responses."""

    prompts: tuple[str, ...]
    scores: np.ndarray
    attributes: tuple[str, ...]
    source: str
    dropped: int = 0


def generate_scores(n_prompts: int, K: int = 4, *, correlation: np.ndarray = DEFAULT_CORRELATION,
                    level_probabilities: np.ndarray = DEFAULT_LEVEL_PROBABILITIES,
                    prompt_share: float = DEFAULT_PROMPT_SHARE, seed: int = 0) -> ScoreTable:
    """A HelpSteer-like table of ``n_prompts`` prompts with ``K`` responses each (the model of the
    module docstring), drawn from ``np.random.default_rng(seed)``. ``correlation`` must be a
    correlation matrix (symmetric, unit diagonal, positive definite) over the attributes and each row
    of ``level_probabilities`` a distribution over the scores 0-4."""
    from scipy.stats import norm

    R = np.asarray(correlation, dtype=float)
    L = np.asarray(level_probabilities, dtype=float)
    A = len(ATTRIBUTES)
    if n_prompts < 1 or K < 2:
        raise ValueError(f"need n_prompts >= 1 and K >= 2 (got {n_prompts}, {K})")
    if R.shape != (A, A) or not np.allclose(R, R.T) or not np.allclose(np.diag(R), 1) \
            or np.linalg.eigvalsh(R).min() <= 0:
        raise ValueError(f"correlation must be a positive-definite {A}x{A} correlation matrix over {ATTRIBUTES}")
    if L.shape != (A, LEVELS) or (L < 0).any() or not np.allclose(L.sum(1), 1):
        raise ValueError(f"level_probabilities must be {A} rows of {LEVELS} probabilities (scores 0-4) summing to 1")
    if not 0 <= prompt_share < 1:
        raise ValueError(f"prompt_share={prompt_share} must lie in [0, 1)")
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(R)
    shared = rng.standard_normal((n_prompts, 1, A)) @ chol.T
    own = rng.standard_normal((n_prompts, K, A)) @ chol.T
    z = math.sqrt(prompt_share) * shared + math.sqrt(1 - prompt_share) * own
    cuts = norm.ppf(np.cumsum(L, 1)[:, :-1])                     # (A, 4) thresholds between the scores
    scores = (z[..., None] > cuts).sum(-1)
    prompts = tuple(f"generated prompt {p + 1}" for p in range(n_prompts))
    return ScoreTable(prompts, scores.astype(np.int64), ATTRIBUTES,
                      f"{n_prompts} generated HelpSteer-like prompts with {K} responses each (seed {seed})")


def load_scores(path, K: int = 4) -> ScoreTable:
    """A reader's score table: a CSV file with a header naming the columns ``prompt``, ``response`` and
    the five attributes (any order; other columns are ignored), one response per line, each score an
    integer from 0 to 4 (NVIDIA HelpSteer's ``train`` split written with ``to_csv`` has this form). The
    responses of a prompt are grouped by the prompt's text; prompts with at least ``K`` responses keep
    their first ``K`` (in file order), the others are dropped and counted.

    A file that cannot be read, a header without a needed column, a line with the wrong number of
    fields, a score that is not an integer from 0 to 4, or a file without any prompt of ``K``
    responses raises a :class:`ValueError` naming the file, the line and the fix."""
    source = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"scores_path={source!r} cannot be read ({exc}); give a CSV file with columns prompt, "
                         f"response, {', '.join(ATTRIBUTES)}, or None for the generated table") from exc
    needed = ("prompt", "response") + ATTRIBUTES
    if not rows:
        raise ValueError(f"{source} is empty; its first line must be a header naming {', '.join(needed)}")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{source}, line 1: the header lacks {', '.join(missing)}; name the columns "
                         f"{', '.join(needed)} (other columns are ignored)")
    col = {c: header.index(c) for c in needed}
    grouped: dict[str, list[list[int]]] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{source}, line {lineno}: {len(row)} fields where the header has {len(header)}; "
                             "quote fields that contain commas")
        values = []
        for a in ATTRIBUTES:
            text = row[col[a]].strip()
            if not (text.isdigit() and 0 <= int(text) < LEVELS):
                raise ValueError(f"{source}, line {lineno}: {a} = {text!r} is not an integer score from 0 to 4")
            values.append(int(text))
        grouped.setdefault(row[col["prompt"]], []).append(values)
    kept = {p: v[:K] for p, v in grouped.items() if len(v) >= K}
    if not kept:
        raise ValueError(f"{source}: no prompt has {K} responses ({len(grouped)} prompts read); each prompt "
                         f"needs at least {K} lines with the same prompt text")
    return ScoreTable(tuple(kept), np.array(list(kept.values()), dtype=np.int64), ATTRIBUTES,
                      f"`{Path(source).name}` ({len(kept)} prompts with {K} responses, passed as `scores_path`)",
                      dropped=len(grouped) - len(kept))


def provenance(scores_path, table: ScoreTable) -> str:
    """One sentence for the page saying which score table a run used: the generated one (written for
    this book, not HelpSteer) or the reader's file, with the number of prompts kept and dropped."""
    if scores_path is None:
        return (f"{table.source}, scores drawn by the book's generator (not NVIDIA HelpSteer, which the "
                "book's runs cannot read)")
    return table.source + (f"; {table.dropped} prompts with fewer responses left out" if table.dropped else "")
