"""Verification records: every chapter ends in a table of what it checked, grouped by kind.

A check has one of three kinds, and only one of them is evidence about a paper:

* ``identity``: the code computes the algebra the chapter derives (exact up to rounding, or up to a
  Monte-Carlo tolerance in standard errors); it can fail only through a bug;
* ``bound``: a deterministic inequality the chapter proves, which holds whatever the data;
* ``prediction``: what a paper claims about a real model or sampled data, which the run could
  contradict. It is registered before the run in the chapter's registry
  (:mod:`prefdyn.book.registry`): statistic, threshold, sizes per scale, power and false-pass rate.

``passed`` is computed here from the numbers, never set by hand, so every check can fail. An
identity or a bound that fails fails the notebook (and CI); a prediction that fails is a result,
shown as ``not reproduced`` with its numbers. A prediction whose power at this run's size is below
:data:`~prefdyn.book.registry.ADEQUATE_POWER` is ``underpowered`` and counts as evidence neither way.
Numbers shown but not checked are recorded with :meth:`Verification.report`, glued into the prose
and saved with the checks, so every recorded run carries them too.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

from ..store import atomic_write_json
from .glue import glue_markdown, glue_value, markdown_table
from .registry import ADEQUATE_POWER, MAX_FALSE_PASS, Registry, load_registry
from .runs import chapter_ids, current_chapter, current_checks_path, is_failure, load_checks, load_recorded_runs

BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}
KINDS = ("prediction", "identity", "bound")
KIND_TITLES = {"prediction": "Predictions (registered before the run; evidence about the papers)",
               "identity": "Identities (the code computes the derived algebra; a failure is a bug)",
               "bound": "Bounds (deterministic inequalities proved in the chapter; a failure is a bug)",
               "unclassified": "Checks recorded before checks had kinds"}
REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"


class VerificationFailed(AssertionError):
    """Raised at the end of a chapter when an identity or a bound failed (a bug, not a result)."""


@dataclass(frozen=True)
class Check:
    kind: str
    claim: str
    predicted: Any
    observed: Any
    tolerance: str
    passed: bool
    status: str
    prediction: dict | None = None   # for predictions: id, statistic, n, power, false-pass, effect

    def _repr_markdown_(self) -> str:
        """How a check shows when a notebook cell ends with it: one line, not the dataclass repr."""
        return f"**{self.status}** ({self.kind}): {self.claim} (measured {fmt(self.observed)}; {self.tolerance})"


def fmt(x: Any) -> str:
    """A number as the tables show it (3–4 significant figures)."""
    if isinstance(x, (bool, int)) or x is None:
        return str(x)
    if isinstance(x, float):
        if x == 0 or math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.3g}" if (abs(x) < 1e-3 or abs(x) >= 1e4) else f"{x:.4f}".rstrip("0").rstrip(".")
    return str(x)


def prediction_status(passed: bool, power: float, false_pass: float) -> str:
    """``reproduced`` / ``not reproduced`` when the test is adequate (power ≥ 0.8 at this size and
    false-pass rate ≤ 0.05), else ``underpowered`` or ``not selective`` with the outcome."""
    outcome = "passed" if passed else "failed"
    if power < ADEQUATE_POWER:
        return f"underpowered ({outcome})"
    if false_pass > MAX_FALSE_PASS:
        return f"not selective ({outcome})"
    return REPRODUCED if passed else NOT_REPRODUCED


def outcome(status: str) -> str:
    """A check's result without its detail: ``underpowered (passed)`` -> ``underpowered``."""
    return status.split(" (")[0]


def check_key(check: dict) -> str:
    """What identifies a check across runs: a prediction's id, else its claim."""
    return check["prediction"]["id"] if check.get("prediction") else check["claim"]


def render_table(checks: list[dict]) -> str:
    """Checks (as saved in JSON) as Markdown tables, one per kind, predictions first."""
    out = []
    for kind in KINDS + ("unclassified",):
        group = [c for c in checks if c["kind"] == kind]
        if not group:
            continue
        out += [f"**{KIND_TITLES[kind]}**", ""]
        if kind == "prediction":
            rows = []
            for c in group:
                p = c["prediction"]
                n = f"{p['n']} {p['units']}" + ("" if p["n"] == p["registered_n"] else
                                                f" (registered {p['registered_n']})")
                claim = c["claim"] + (" *(simulation)*" if p.get("setting") == "simulation" else "")
                rows.append([claim, p["statistic"], f"{fmt(c['observed'])} ({c['tolerance']})", n,
                             f"{p['power']:.2f}, {p['false_pass']:.3f}", f"**{c['status']}**"])
            out.append(markdown_table(["prediction", "statistic", "measured (passes if)", "n",
                                       "power, false-pass", "result"], rows))
        else:
            out.append(markdown_table(["claim", "expected", "measured", "tolerance", "result"],
                                      [[c["claim"], fmt(c["predicted"]), fmt(c["observed"]), c["tolerance"],
                                        c["status"]] for c in group]))
        out.append("")
    return "\n".join(out).rstrip()


def summary_line(checks: list[dict]) -> str:
    """"14 identities and 3 bounds hold; predictions: 2 reproduced, 1 not reproduced, 3 underpowered"."""
    parts = []
    for kind, word in (("identity", "identities"), ("bound", "bounds")):
        group = [c for c in checks if c["kind"] == kind]
        if group:
            failed = sum(not c["passed"] for c in group)
            parts.append(f"{len(group)} {word if len(group) != 1 else kind}" +
                         (f" ({failed} FAILED)" if failed else ""))
    preds = [c for c in checks if c["kind"] == "prediction"]
    line = " and ".join(parts) + (" hold" if parts and not any(is_failure(c) for c in checks) else "")
    if preds:
        counts: dict[str, int] = {}
        for c in preds:
            counts[outcome(c["status"])] = counts.get(outcome(c["status"]), 0) + 1
        line += ("; " if line else "") + f"{len(preds)} predictions: " + \
            ", ".join(f"{v} {k}" for k, v in counts.items())
    return line or "no checks"


def reported_value(r: dict) -> str:
    text = fmt(r["value"])
    if r.get("interval"):
        text += f" [{fmt(r['interval'][0])}, {fmt(r['interval'][1])}]"
    return text


def runs_table(live: dict, recorded: list[dict]) -> str:
    """This run beside every recorded run of the chapter: rows are checks and reported values,
    columns runs; a cell is the measurement and its result (``—`` where a run lacks the row)."""
    runs = [("this run", live)] + [(f"`{r['label']}`", r) for r in recorded]
    rows: dict[str, list[str]] = {}
    order: list[tuple[str, str]] = []
    for j, (_, run) in enumerate(runs):
        for c in run["checks"]:
            key = ("check", check_key(c))
            if key not in rows:
                rows[key] = ["—"] * len(runs)
                order.append((key, c["claim"]))
            rows[key][j] = f"{fmt(c['observed'])} ({c['status']})"
        for r in run.get("reported", []):
            key = ("reported", r["name"])
            if key not in rows:
                rows[key] = ["—"] * len(runs)
                order.append((key, f"reported: {r['description'] or r['name']}"))
            rows[key][j] = reported_value(r)
    table = markdown_table(["row"] + [name for name, _ in runs], [[label] + rows[key] for key, label in order])
    legend = [f"- `{r['label']}`: " + run_facts(r) for r in recorded]
    return table + ("\n\nRecorded runs:\n\n" + "\n".join(legend) if legend else
                               "\n\n*No other run of this chapter has been recorded.*")


def run_facts(rec: dict) -> str:
    """One line saying how a recorded run was made."""
    p = rec.get("parameters", {})
    data = rec.get("data") or p.get("data_dir") or "the book's own data"
    git = rec.get("git") or "revision not recorded"
    return (f"scale `{p.get('scale', '?')}` on {rec.get('hardware') or 'unrecorded hardware'}, model "
            f"`{rec.get('model') or p.get('model', 'the default')}`, data: {data}; git `{git}`, "
            f"finished {rec.get('finished', '?')}" + ("; recorded before checks had kinds" if rec.get("legacy") else ""))


@dataclass
class Verification:
    """The checks and reported values of one chapter, in the order they were made.

    ``chapter`` defaults to the id the executor hands the kernel; the registry is read at
    construction (by :func:`prefdyn.experiments.start`, before any data are touched). ``scale``
    picks the registered sizes.
    """

    chapter: str | None = None
    scale: str = "ci"
    registry: Registry | None = None
    checks: list[Check] = field(default_factory=list)
    reported: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.chapter = self.chapter or current_chapter()
        if self.registry is None and self.chapter:
            self.registry = load_registry(self.chapter)
        self.chapter = self.chapter or "this chapter"

    def _add(self, kind: str, claim: str, predicted: Any, observed: Any, tolerance: str, passed: bool,
             prediction: dict | None = None, status: str | None = None) -> Check:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        passed = bool(passed)
        check = Check(kind, claim, predicted, observed, tolerance, passed,
                      status or ("pass" if passed else "FAIL"), prediction)
        self.checks.append(check)
        return check

    @staticmethod
    def _kind(kind: str) -> str:
        if kind not in ("identity", "bound"):
            raise ValueError(f"kind={kind!r}: close/at_least/above/at_most make identities or bounds; "
                             "a prediction is registered and checked with Verification.predict")
        return kind

    def close(self, claim: str, predicted: float, observed: float, atol: float, *, kind: str) -> Check:
        """Pass iff ``|observed - predicted| <= atol`` (NaN never passes)."""
        predicted, observed = float(predicted), float(observed)
        return self._add(self._kind(kind), claim, predicted, observed, f"|obs - pred| <= {fmt(float(atol))}",
                         abs(observed - predicted) <= atol)

    def _bound(self, claim: str, observed: float, symbol: str, bound: float, predicted: Any, kind: str) -> Check:
        """One-sided check ``observed <symbol> bound``; NaN never passes."""
        observed, text = float(observed), f"{symbol} {fmt(float(bound))}"
        return self._add(self._kind(kind), claim, text if predicted is None else predicted, observed,
                         f"observed {text}", BOUNDS[symbol](observed, bound))

    def at_least(self, claim: str, observed: float, bound: float, predicted: Any = None, *, kind: str) -> Check:
        """Pass iff ``observed >= bound``; ``predicted`` describes the theory's statement."""
        return self._bound(claim, observed, ">=", bound, predicted, kind)

    def above(self, claim: str, observed: float, bound: float, predicted: Any = None, *, kind: str) -> Check:
        """Pass iff ``observed > bound`` (strictly)."""
        return self._bound(claim, observed, ">", bound, predicted, kind)

    def at_most(self, claim: str, observed: float, bound: float, predicted: Any = None, *, kind: str) -> Check:
        """Pass iff ``observed <= bound``."""
        return self._bound(claim, observed, "<=", bound, predicted, kind)

    def predict(self, pid: str, observed: float, n: int) -> Check:
        """Check the registered prediction ``pid`` on its statistic ``observed`` from ``n``
        measurements. Its threshold, effect and no-effect value come from the registry, never the call;
        power and false-pass rate are computed at ``n`` (the registered size at this scale is shown
        beside it when they differ, e.g. with the user's own data)."""
        if self.registry is None:
            raise ValueError("predictions need the chapter's registry, found through the chapter's id: run "
                             "the chapter with `prefdyn run <id>` (or set PREFDYN_CHAPTER=<id>)")
        p = self.registry.prediction(pid)
        if any(c.prediction and c.prediction["id"] == pid for c in self.checks):
            raise ValueError(f"prediction {pid!r} was already checked in this run")
        observed, n = float(observed), int(n)
        power, false_pass = p.power(n), p.false_pass(n)
        passed = p.passes(observed)
        info = {"id": pid, "statistic": p.statistic, "n": n, "registered_n": p.n.get(self.scale, n),
                "units": p.units, "power": power, "false_pass": false_pass, "effect": p.effect,
                "effect_source": p.effect_source, "no_effect": p.no_effect, "setting": p.setting}
        check = self._add("prediction", p.claim, f"effect {fmt(p.effect)} ({p.effect_source})", observed,
                          p.passes_if, passed, info, prediction_status(passed, power, false_pass))
        glue_value(f"{pid.replace('-', '_')}_status", check.status)
        return check

    def report(self, name: str, value: Any, interval: tuple[float, float] | None = None,
               description: str = "") -> Any:
        """Record a number (or a run-dependent word) that the chapter shows but does not check: glued
        as ``name`` (and ``name_lo``/``name_hi`` for an interval), saved with the checks. Returns ``value``."""
        if any(r["name"] == name for r in self.reported):
            raise ValueError(f"{name!r} was already reported in this run")
        value = value.item() if hasattr(value, "item") else value
        entry = {"name": name, "value": value, "description": description,
                 "interval": [float(interval[0]), float(interval[1])] if interval is not None else None}
        self.reported.append(entry)
        glue_value(name, value)
        if interval is not None:
            glue_value(f"{name}_lo", entry["interval"][0])
            glue_value(f"{name}_hi", entry["interval"][1])
        return value

    @property
    def passed(self) -> bool:
        """No identity or bound failed (predictions are results, whichever way they come out)."""
        return bool(self.checks) and not any(is_failure(asdict(c)) for c in self.checks)

    def table(self) -> str:
        """The verification tables as Markdown (MyST renders them in the book)."""
        return render_table(self.to_json()["checks"])

    def to_json(self) -> dict:
        return {"chapter": self.chapter, "scale": self.scale, "checks": [asdict(c) for c in self.checks],
                "reported": list(self.reported)}

    def finish(self, run=None, glue_name: str = "verification") -> None:
        """Close the chapter: glue the tables, the summary line and (given the chapter's ``run``) its
        scale, device and the comparison with every recorded run; save the checks JSON atomically
        where the executor asked for it; then fail if an identity or a bound failed."""
        if not self.checks:
            raise VerificationFailed(f"{self.chapter}: no checks were made")
        record = self.to_json()
        if run is not None:
            glue_value("run_scale", run.scale)
            glue_value("run_device", str(run.device))
            glue_markdown("recorded", runs_table(record, load_recorded_runs(self.chapter)))
        glue_markdown(glue_name, self.table())
        glue_value("verification_summary", summary_line(record["checks"]))
        checks_path = current_checks_path()
        if checks_path is not None:
            atomic_write_json(checks_path, record)
        failed = [c["claim"] for c in record["checks"] if is_failure(c)]
        if failed:
            raise VerificationFailed(f"{self.chapter}: {len(failed)} identity/bound check(s) failed "
                                     "(a bug, not a result): " + "; ".join(failed))


def summary(chapters: list[str] | None = None) -> str:
    """One line per chapter counting its checks by kind and result, then each check that did not pass."""
    lines = []
    for chapter in chapters or chapter_ids():
        checks = load_checks(chapter)["checks"]
        if not checks:
            lines.append(f"{chapter}: no results yet")
            continue
        lines.append(f"{chapter}: {summary_line(checks)}")
        lines += [f"    {c['status']} ({c['kind']}) {c['claim']}: observed {c['observed']} ({c['tolerance']})"
                  for c in checks if not c["passed"]]
    return "\n".join(lines)
