"""Does the code still give the numbers the book has published? A run compared with a recorded one.

Every chapter commits a reference run, ``book/recorded/<id>/reference-smoke.json`` (scale ``smoke``,
the default model and the packaged data), recorded with ``prefdyn record <id> --label
reference-smoke``. ``make test`` executes each chapter at ``smoke`` and :func:`compare` holds every
check (its observed value, its expected value, its result) and every reported value against the
reference; a difference fails with :func:`difference_table`. Changing a result on purpose means
re-recording the reference in the same commit, so the JSON's diff shows the change in review.
``prefdyn reproduce <id> <label>`` re-runs any recorded run with its exact parameters
(:func:`reproduce_parameters`) and prints the same table.

Tolerance (:data:`RTOL`, :data:`ATOL`): integers, booleans, strings and verdicts must be equal;
floats within ``ATOL + RTOL·|recorded|``; an identity is held to its result, not to its rounding
residual (:data:`IDENTITY_FIELDS`). Two executions on one machine give identical numbers (the
determinism test); across machines the processor's kernels change the order of floating-point
reductions. ``benchmarks/reference_tolerance.py`` measured that by executing every chapter at ``smoke``
with ATen's AVX2 and generic kernels and MKL's AVX2 and compatible code paths beside this machine's
AVX-512 ones (numbers in ``benchmarks/README.md``): no verdict, integer or word changed; every float
that moved moved by at most 1e-4 of its value or by at most 1.5e-4 in absolute terms (chapter 4's
L-BFGS fits, whose residuals and the small smoke-scale differences built on them move most). The
tolerance is about ten times both: 1e-3 relative, 1e-3 absolute.
"""
from __future__ import annotations

import ast
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .glue import markdown_table
from .runs import ChapterError, load_recorded_runs, root

REFERENCE_LABEL = "reference-smoke"
RTOL = 1e-3
ATOL = 1e-3


@dataclass(frozen=True)
class Difference:
    row: str          # "check: <key>" or "reported: <name>"
    field: str        # what differs: observed, status, value, ...
    recorded: Any
    live: Any

    @property
    def verdict(self) -> bool:
        """A changed result (a check's status), not only a moved number."""
        return self.field == "status"


def close(a: Any, b: Any, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Equal within the tolerance: floats within ``atol + rtol·|a|`` (NaN equals NaN), containers
    element by element, everything else exactly (an int never equals a float it happens to round to
    unless they are equal)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= atol + rtol * abs(a)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b


def _check_key(check: dict) -> str:
    return check["prediction"]["id"] if check.get("prediction") else check["claim"]


CHECK_FIELDS = ("predicted", "observed", "passed", "status")
# an identity's observed value is its rounding residual (|computed - exact|, ~1e-16 to 1e-5): it moves by
# tens of per cent between processors while staying far inside the identity's own tolerance, so an
# identity is held to its result (passed, status), not to its residual
IDENTITY_FIELDS = ("predicted", "passed", "status")
PREDICTION_FIELDS = ("n", "power", "false_pass", "control")


def compare(recorded: dict, live: dict, rtol: float = RTOL, atol: float = ATOL) -> list[Difference]:
    """Every difference between two runs' checks and reported values (``{"checks", "reported"}``):
    a row only one run has, or a field that differs beyond the tolerance (an identity's residual
    excepted, see :data:`IDENTITY_FIELDS`)."""
    out: list[Difference] = []

    def fields(c: dict) -> dict:
        held = IDENTITY_FIELDS if c.get("kind") == "identity" else CHECK_FIELDS
        return {**{f: c.get(f) for f in held},
                **{f: c["prediction"].get(f) for f in PREDICTION_FIELDS if c.get("prediction")}}

    def rows(run: dict) -> dict[str, dict]:
        found = {f"check: {_check_key(c)}": fields(c) for c in run.get("checks", [])}
        found.update({f"reported: {r['name']}": {"value": r["value"], "interval": r.get("interval")}
                      for r in run.get("reported", [])})
        return found

    old, new = rows(recorded), rows(live)
    for row in list(old) + [r for r in new if r not in old]:
        if row not in new or row not in old:
            out.append(Difference(row, "row", "present" if row in old else "absent", "present" if row in new else "absent"))
            continue
        for field, value in old[row].items():
            if not close(value, new[row].get(field), rtol, atol):
                out.append(Difference(row, field, value, new[row].get(field)))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def difference_table(differences: list[Difference]) -> str:
    """The differences as a Markdown table, changed verdicts first; a line saying none when empty."""
    if not differences:
        return "Every check and reported value agrees with the recorded run within the tolerance."
    ordered = sorted(differences, key=lambda d: not d.verdict)
    verdicts = sum(d.verdict for d in differences)
    head = (f"{len(differences)} difference{'s' if len(differences) != 1 else ''} beyond the tolerance "
            f"(floats: {ATOL} + {RTOL}·|recorded|; everything else exact), {verdicts} of them changed verdicts:")
    return head + "\n\n" + markdown_table(["row", "field", "recorded", "this run"],
                                          [[d.row, d.field, _short(d.recorded), _short(d.live)] for d in ordered])


def find_record(chapter: str, label: str) -> dict:
    for rec in load_recorded_runs(chapter):
        if rec["label"] == label:
            return rec
    labels = ", ".join(r["label"] for r in load_recorded_runs(chapter)) or "none"
    raise ChapterError(f"{chapter} has no recorded run {label!r} (recorded: {labels})")


def parameter_value(text: str) -> Any:
    """A chapter default as the run record keeps it (its source text) as a Python value."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def reproduce_parameters(record: dict) -> dict[str, Any]:
    """The exact parameters a recorded run used: those it was given, else the chapter's defaults at
    its revision (kept as source text in the record), so a default changed since does not leak in."""
    return {**{k: parameter_value(v) for k, v in record.get("defaults", {}).items()}, **record.get("parameters", {})}


def is_ancestor(revision: str) -> bool:
    """Is the recorded code (``abc1234``, optionally ``+dirty``) an ancestor of this checkout?"""
    rev = revision.split("+")[0]
    result = subprocess.run(["git", "-C", str(root()), "merge-base", "--is-ancestor", rev, "HEAD"],
                            capture_output=True, text=True, timeout=30)
    return result.returncode == 0


def environment_differences(record: dict, meta: dict) -> list[str]:
    """The packages, Python and hardware of the record against this run's, one line each where they differ."""
    lines = []
    for name in sorted(set(record.get("packages", {})) | set(meta.get("packages", {}))):
        a, b = record.get("packages", {}).get(name), meta.get("packages", {}).get(name)
        if a != b:
            lines.append(f"{name}: recorded {a or 'absent'}, here {b or 'absent'}")
    for key in ("python", "hardware"):
        if record.get(key) != meta.get(key):
            lines.append(f"{key}: recorded {record.get(key) or 'unrecorded'}, here {meta.get(key)}")
    return lines


def check_data(record: dict, parameters: dict, data_override: dict[str, str]) -> list[str]:
    """Point the run's data parameters at the reader's copies (``data_override``) and check them
    against the record's checksum where it has one; returns what was checked, raises on a mismatch
    or when a record's own files are needed and not given."""
    from .runs import DATA_PARAMETERS, data_checksum

    notes = []
    for name in DATA_PARAMETERS:
        recorded_value = parameters.get(name)
        if name in data_override:
            parameters[name] = data_override[name]
        elif recorded_value and not Path(str(recorded_value)).exists():
            raise ChapterError(f"the recorded run read {name}={recorded_value!r}, which is not on this machine; "
                               f"pass your copy: prefdyn reproduce ... --data {name}=PATH")
        value = parameters.get(name)
        want = (record.get("data_sha256") or {}).get(name)
        if value and want:
            have = data_checksum(Path(str(value)))
            if have != want:
                raise ChapterError(f"{name}={value}: its checksum {have[:12]}… is not the recorded run's "
                                   f"{want[:12]}…; this is not the data that run used")
            notes.append(f"{name}: checksum matches the record ({want[:12]}…)")
        elif value:
            notes.append(f"{name}: the record holds no checksum; not verified")
    return notes
