"""Verification records: every chapter ends in a table of claims checked against measurements.

A :class:`Check` states a claim, what the theory predicts, what was measured and the tolerance
fixed *before* the run; ``passed`` is computed here from those numbers, never set by hand, so a
check can always fail. :class:`Verification` collects a chapter's checks, renders the table, glues
it (and figures) into the book with myst-nb, saves the JSON next to the executed notebook, and
finally raises if any check failed, which fails the notebook and so CI.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

from ..store import atomic_write_json
from .glue import glue_markdown, glue_value
from .runs import current_chapter, current_checks_path, load_recorded

BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}


class VerificationFailed(AssertionError):
    """Raised at the end of a chapter when at least one check failed."""


@dataclass(frozen=True)
class Check:
    claim: str
    predicted: Any
    observed: Any
    tolerance: str
    passed: bool

    def _repr_markdown_(self) -> str:
        """How a check shows when a notebook cell ends with it: one line, not the dataclass repr."""
        mark = "✅ pass" if self.passed else "❌ **FAIL**"
        return f"{mark}: {self.claim} (measured {_fmt(self.observed)}; {self.tolerance})"


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0 or math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.3g}" if (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(x)


def render_table(checks: list[dict]) -> str:
    """Checks (as saved in JSON) as a Markdown table."""
    rows = ["| # | claim | theory predicts | measured | tolerance | result |",
            "|---|---|---|---|---|---|"]
    for i, c in enumerate(checks, 1):
        result = "✅ pass" if c["passed"] else "❌ **FAIL**"
        cells = [str(i), c["claim"], _fmt(c["predicted"]), _fmt(c["observed"]), c["tolerance"], result]
        rows.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
    return "\n".join(rows)


def recorded_markdown(chapter: str, scale: str = "full") -> str:
    """The chapter's recorded run at ``scale`` (made on another machine, committed with the book),
    with its hardware, date and time, for display beside the live run."""
    rec = load_recorded(chapter, scale)
    if rec is None:
        return f"*No run at `scale={scale}` has been recorded for this chapter yet.*"
    passed = sum(c["passed"] for c in rec["checks"])
    head = (f"Recorded at `scale={scale}` on **{rec['hardware']}**, finished {rec['finished']}, "
            f"{rec['seconds']:.0f} s, torch {rec['packages'].get('torch')}, transformers "
            f"{rec['packages'].get('transformers')}: **{passed}/{len(rec['checks'])} checks passed**.")
    return head + "\n\n" + render_table(rec["checks"])


class Verification:
    """The checks of one chapter, in the order they were made.

    ``chapter`` defaults to the id the executor hands the kernel (:func:`prefdyn.book.runs.current_chapter`).
    """

    def __init__(self, chapter: str | None = None):
        self.chapter = chapter or current_chapter() or "this chapter"
        self.checks: list[Check] = []
    def _add(self, claim: str, predicted: Any, observed: Any, tolerance: str, passed: bool) -> Check:
        check = Check(claim, predicted, observed, tolerance, bool(passed))
        self.checks.append(check)
        return check

    def close(self, claim: str, predicted: float, observed: float, atol: float) -> Check:
        """Pass iff ``|observed - predicted| <= atol`` (NaN never passes)."""
        predicted, observed = float(predicted), float(observed)
        return self._add(claim, predicted, observed, f"|obs - pred| <= {_fmt(float(atol))}",
                         abs(observed - predicted) <= atol)

    def _bound(self, claim: str, observed: float, symbol: str, bound: float, predicted: Any) -> Check:
        """One-sided check ``observed <symbol> bound``; NaN never passes."""
        observed, text = float(observed), f"{symbol} {_fmt(float(bound))}"
        return self._add(claim, text if predicted is None else predicted, observed, f"observed {text}",
                         BOUNDS[symbol](observed, bound))

    def at_least(self, claim: str, observed: float, bound: float, predicted: Any = None) -> Check:
        """Pass iff ``observed >= bound``; ``predicted`` describes the theory's statement."""
        return self._bound(claim, observed, ">=", bound, predicted)

    def above(self, claim: str, observed: float, bound: float, predicted: Any = None) -> Check:
        """Pass iff ``observed > bound`` (strictly)."""
        return self._bound(claim, observed, ">", bound, predicted)

    def at_most(self, claim: str, observed: float, bound: float, predicted: Any = None) -> Check:
        """Pass iff ``observed <= bound``."""
        return self._bound(claim, observed, "<=", bound, predicted)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def table(self) -> str:
        """The verification table as Markdown (MyST renders it in the book)."""
        return render_table(self.to_json())

    def to_json(self) -> list[dict]:
        return [asdict(c) for c in self.checks]

    def finish(self, run=None, glue_name: str = "verification") -> None:
        """Close the chapter: glue the table (and, given the chapter's ``run``, its scale, device and
        recorded full-scale run), save the checks JSON atomically where the executor asked for it,
        then fail if any check failed."""
        if not self.checks:
            raise VerificationFailed(f"{self.chapter}: no checks were made")
        if run is not None:
            glue_value("run_scale", run.scale)
            glue_value("run_device", str(run.device))
            glue_markdown("recorded", recorded_markdown(self.chapter))
        glue_markdown(glue_name, self.table())
        checks_path = current_checks_path()
        if checks_path is not None:
            atomic_write_json(checks_path, self.to_json())
        failed = [c.claim for c in self.checks if not c.passed]
        if failed:
            raise VerificationFailed(f"{self.chapter}: {len(failed)} check(s) failed: " + "; ".join(failed))
