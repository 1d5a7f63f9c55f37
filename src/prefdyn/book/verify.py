"""Verification records: every chapter ends in a table of what it checked, grouped by kind.

A check has one of three kinds, and only one of them is evidence about a paper:

* ``identity``: the code computes the algebra the chapter derives (exact up to rounding, or up to a
  Monte-Carlo tolerance in standard errors); it can fail only through a bug;
* ``bound``: a deterministic inequality the chapter proves, which holds whatever the data;
* ``prediction``: what a paper claims about a real model or sampled data, which the run could
  contradict. It is registered before the run in the chapter's registry
  (:mod:`prefdyn.book.registry`): statistic, threshold, sizes per scale, power and false-pass rate.

``passed`` is computed here from the numbers, never set by hand, so every check can fail. An
identity or a bound that fails fails the notebook (and CI); a prediction that fails is a result.
Its status follows the verdict rule of :func:`prediction_status`: ``reproduced``, ``not
reproduced``, ``implied by <identity>`` (a checked identity forces the outcome in the measured
regime: no evidence) or ``inconclusive (<why>)``. The power and false-pass rate it uses are simulated
from the run's own units (a *world*, :mod:`prefdyn.stats`), the closed forms kept beside them.
Numbers shown but not checked are recorded with :meth:`Verification.report`, glued into the prose
and saved with the checks, so every recorded run carries them too.
"""
from __future__ import annotations

import math
import operator
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from ..stats import simulated_pass_rate
from ..store import atomic_write_json
from .glue import glue_markdown, glue_value, markdown_table
from .registry import ADEQUATE_POWER, MAX_FALSE_PASS, Registry, load_registry
from .runs import (chapter_ids, current_chapter, current_checks_path, current_parameters, is_failure, load_checks,
                   load_recorded_runs)

BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}
KINDS = ("prediction", "identity", "bound")
KIND_TITLES = {"prediction": "Predictions (registered before the run; evidence about the papers)",
               "identity": "Identities (the code computes the derived algebra; a failure is a bug)",
               "bound": "Bounds (deterministic inequalities proved in the chapter; a failure is a bug)",
               "unclassified": "Checks recorded before checks had kinds"}
REPRODUCED, NOT_REPRODUCED, IMPLIED, INCONCLUSIVE = "reproduced", "not reproduced", "implied by", "inconclusive"
OUTCOMES = (REPRODUCED, NOT_REPRODUCED, IMPLIED, INCONCLUSIVE)
RATE_GAP = 0.1   # simulated and closed-form rates further apart than this are both shown


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


def prediction_status(passed: bool, power: float, false_pass: float, *, control: dict | None = None,
                      implied_by: str | None = None, missing: str | None = None) -> str:
    """The verdict rule. In order:

    1. ``implied by <identity>`` when a checked identity forces the outcome in the measured regime;
    2. ``inconclusive (<missing>)`` when the registration lacks what the rule needs (a null world, a
       positive control) or the run did not simulate its power;
    3. ``inconclusive (no headroom: …)`` when the positive control failed: the run could not have
       shown the effect, so neither outcome is evidence;
    4. a pass is evidence (``reproduced``) when the false-pass rate is at most 0.05, a failure
       (``not reproduced``) when the power is at least 0.8; otherwise ``inconclusive (passed;
       false-pass …)`` or ``inconclusive (failed; power …)``.
    """
    if implied_by:
        return f"{IMPLIED} {implied_by}"
    if missing:
        return f"{INCONCLUSIVE} ({missing})"
    if control is not None and not control["passed"]:
        return (f"{INCONCLUSIVE} (no headroom: {control['claim']}: measured {fmt(control['observed'])}, "
                f"needs {control['passes_if']})")
    if passed:
        return REPRODUCED if false_pass <= MAX_FALSE_PASS else \
            f"{INCONCLUSIVE} (passed; false-pass {false_pass:.2f} > {MAX_FALSE_PASS})"
    return NOT_REPRODUCED if power >= ADEQUATE_POWER else \
        f"{INCONCLUSIVE} (failed; power {power:.2f} < {ADEQUATE_POWER})"


def outcome(status: str) -> str:
    """A check's result without its detail: ``inconclusive (failed; power 0.41 < 0.8)`` ->
    ``inconclusive``, ``implied by eq-1`` -> ``implied by``; identities and bounds: ``pass``/``FAIL``.
    Statuses of the earlier rule (``underpowered``, ``not selective``) read as ``inconclusive``."""
    for word in (NOT_REPRODUCED, REPRODUCED, IMPLIED, INCONCLUSIVE):
        if status.startswith(word):
            return word
    if status.startswith(("underpowered", "not selective")):
        return INCONCLUSIVE
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
                control = p.get("control")
                result = f"**{c['status']}**" + (
                    f"; control: {control['claim']}, {fmt(control['observed'])} ({control['passes_if']}, "
                    f"{'met' if control['passed'] else 'NOT met'})" if control else "")
                rows.append([claim, p["statistic"], f"{fmt(c['observed'])} ({c['tolerance']})", n,
                             rates(p), result])
            out.append(markdown_table(["prediction", "statistic", "measured (passes if)", "n",
                                       "power, false-pass", "result"], rows))
        else:
            out.append(markdown_table(["claim", "expected", "measured", "tolerance", "result"],
                                      [[c["claim"], fmt(c["predicted"]), fmt(c["observed"]), c["tolerance"],
                                        c["status"]] for c in group]))
        out.append("")
    return "\n".join(out).rstrip()


def rates(p: dict) -> str:
    """A prediction's power and false-pass rate as the table shows them: the simulated ones, with
    the closed form beside them where either differs by more than :data:`RATE_GAP`."""
    text = f"{p['power']:.2f}, {p['false_pass']:.3f}"
    if p.get("power_simulated") is None:
        return text + (" (closed form)" if p.get("setting") != "simulation" else "")
    closed = (p.get("power_closed_form"), p.get("false_pass_closed_form"))
    if closed[0] is not None and (abs(closed[0] - p["power"]) > RATE_GAP or abs(closed[1] - p["false_pass"]) > RATE_GAP):
        text += f" (closed form {closed[0]:.2f}, {closed[1]:.3f})"
    return text


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


def same_parameters(a: dict, b: dict) -> bool:
    """Two runs made with the same parameters (the device aside): a recorded run the live one should reproduce."""
    drop = lambda p: {k: v for k, v in p.items() if k != "device"}
    return drop(a) == drop(b)


def drifted(live: dict, recorded: list[dict], parameters: dict | None) -> dict[str, set[str]]:
    """For each recorded run made with the live run's ``parameters``, the rows (``check: <key>`` /
    ``reported: <name>``) whose values the live run no longer reproduces within the tolerance of
    :mod:`prefdyn.book.reproduce`."""
    from .reproduce import compare, reproduce_parameters

    if parameters is None:
        return {}
    return {r["label"]: {d.row for d in compare(r, live)} for r in recorded
            if not r.get("legacy") and same_parameters(reproduce_parameters(r), parameters)}


def runs_table(live: dict, recorded: list[dict], parameters: dict | None = None) -> str:
    """This run beside every recorded run of the chapter: rows are checks and reported values,
    columns runs; a cell is the measurement and its result (``—`` where a run lacks the row). Only
    rows on which the runs differ are shown. A recorded run made with this run's ``parameters``
    should be reproduced: its cells that this run no longer reproduces within the tolerance are
    marked *drift*. Below the table, each recorded run in a line, with the command that re-runs it."""
    runs = [("this run", live)] + [(f"`{r['label']}`", r) for r in recorded]
    drift = drifted(live, recorded, parameters)
    rows: dict[tuple[str, str], list[str]] = {}
    order: list[tuple[tuple[str, str], str]] = []
    for j, (_, run) in enumerate(runs):
        marked = drift.get(run.get("label"), set()) if j else set()
        for c in run["checks"]:
            key = ("check", check_key(c))
            if key not in rows:
                rows[key] = ["—"] * len(runs)
                order.append((key, c["claim"]))
            rows[key][j] = f"{fmt(c['observed'])} ({c['status']})" + (" *drift*" if f"check: {key[1]}" in marked else "")
        for r in run.get("reported", []):
            key = ("reported", r["name"])
            if key not in rows:
                rows[key] = ["—"] * len(runs)
                order.append((key, f"reported: {r['description'] or r['name']}"))
            rows[key][j] = reported_value(r) + (" *drift*" if f"reported: {key[1]}" in marked else "")
    shown = [(key, label) for key, label in order if len(set(rows[key])) > 1]
    hidden = len(order) - len(shown)
    table = markdown_table(["row"] + [name for name, _ in runs], [[label] + rows[key] for key, label in shown]) \
        if shown else "*Every run shows the same values.*"
    notes = [f"{hidden} row{'s' if hidden != 1 else ''} on which every run agrees {'are' if hidden != 1 else 'is'} not shown."] \
        if hidden and shown else []
    notes += [f"`{label}` was made with this run's parameters: " +
              (f"{len(rows_)} of its values are not reproduced within the tolerance (marked *drift*)."
               if rows_ else "every value is reproduced within the tolerance.")
              for label, rows_ in drift.items()]
    chapter = live.get("chapter") or "<chapter>"
    legend = [f"- `{r['label']}`: " + run_facts(r) + f"; rerun: `prefdyn reproduce {chapter} {r['label']}`"
              for r in recorded]
    return "\n\n".join([table] + notes) + ("\n\nRecorded runs:\n\n" + "\n".join(legend) if legend else
                                           "\n\n*No other run of this chapter has been recorded.*")


def run_facts(rec: dict) -> str:
    """One line saying how a recorded run was made."""
    p = rec.get("parameters", {})
    data = rec.get("data") or p.get("data_dir") or "the packaged data"
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

    def predict(self, pid: str, observed: float, n: int | None = None, *, world=None,
                control: float | None = None, regime: float | None = None) -> Check:
        """Check the registered prediction ``pid`` on its statistic ``observed``. Its threshold, effect,
        no-effect value, control and regime rule come from the registry, never the call.

        ``world`` (:class:`prefdyn.stats.MeanWorld`, :class:`~prefdyn.stats.SpearmanWorld`, …) rebuilds
        the statistic from this run's own units; its simulated pass rates at the registered effect and
        at no effect are the power and false-pass rate the verdict uses (the closed form at ``n`` is
        kept beside them). Without a world (allowed for predictions about simulations) the closed form
        decides. ``control`` is the value of the registered positive control measured in this run,
        ``regime`` the value of the statistic that decides whether a checked identity forces the
        outcome (``implied_by``); each is required exactly when the registry declares it."""
        if self.registry is None:
            raise ValueError("predictions need the chapter's registry, found through the chapter's id: run "
                             "the chapter with `prefdyn run <id>` (or set PREFDYN_CHAPTER=<id>)")
        p = self.registry.prediction(pid)
        if any(c.prediction and c.prediction["id"] == pid for c in self.checks):
            raise ValueError(f"prediction {pid!r} was already checked in this run")
        for name, value, declared in (("control", control, p.control), ("regime", regime, p.implied_by)):
            if (value is None) != (declared is None):
                key = "control" if name == "control" else "implied_by"
                raise ValueError(f"prediction {pid!r}: pass {name}= exactly when its registry entry has "
                                 f"`{key}:` (it {'has' if declared else 'has none'})")
        if world is not None:
            if n is not None and int(n) != world.n:
                raise ValueError(f"prediction {pid!r}: n={n} but the world has {world.n} units")
            n = world.n
        if n is None:
            raise ValueError(f"prediction {pid!r}: give n (the number of {p.units}) or a world of them")
        observed, n = float(observed), int(n)
        power_cf, false_pass_cf = p.power(n), p.false_pass(n)
        power_sim = false_pass_sim = None
        if world is not None:
            symbol, threshold = p.comparison
            seed = zlib.crc32(f"{self.chapter}/{pid}".encode())
            power_sim = simulated_pass_rate(world, p.effect, symbol, threshold, seed=seed)
            false_pass_sim = simulated_pass_rate(world, p.no_effect, symbol, threshold, seed=seed + 1)
        power = power_cf if power_sim is None else power_sim
        false_pass = false_pass_cf if false_pass_sim is None else false_pass_sim
        passed = p.passes(observed)
        control_info = None if p.control is None else {
            **p.control, "observed": float(control), "passed": p.control_passes(control)}
        implied = p.implied_by["identity"] if p.implied_by is not None and p.implied(regime) else None
        missing = ("no null world registered" if not p.null_world else
                   "no positive control registered" if p.setting == "real model" and p.control is None else
                   "power not simulated from the run's units" if p.setting == "real model" and world is None
                   else None)
        info = {"id": pid, "version": p.version, "statistic": p.statistic, "n": n,
                "registered_n": p.n.get(self.scale, n), "units": p.units, "power": power,
                "false_pass": false_pass, "power_simulated": power_sim, "false_pass_simulated": false_pass_sim,
                "power_closed_form": power_cf, "false_pass_closed_form": false_pass_cf,
                "effect": p.effect, "effect_source": p.effect_source, "no_effect": p.no_effect,
                "setting": p.setting, "control": control_info,
                "implied_by": None if p.implied_by is None else {**p.implied_by, "regime_observed": float(regime),
                                                                 "implied": implied is not None},
                "null_world": p.null_world, "world": None if world is None else world.to_json()}
        status = prediction_status(passed, power, false_pass, control=control_info, implied_by=implied,
                                   missing=missing)
        check = self._add("prediction", p.claim, f"effect {fmt(p.effect)} ({p.effect_source})", observed,
                          p.passes_if, passed, info, status)
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
            glue_markdown("recorded", runs_table(record, load_recorded_runs(self.chapter), current_parameters()))
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
