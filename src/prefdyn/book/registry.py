"""What each chapter declares before it runs: the papers' claims it treats and its registered predictions.

Every chapter has a registry, ``chapters/claims/<id>.yml``, committed with the chapter and read by
:func:`prefdyn.experiments.start` before any data are touched; ``chapters/claims/papers.yml`` names
the papers. A registry holds

* ``claims``: each claim of a paper the chapter treats: where the paper makes it, what it says, the
  book's ``status`` (``derived`` — derived here and checked exactly; ``reconstructed`` — the paper's
  statement could not be read and the book states its own version; ``empirical`` — a claim about
  models or data only, whose standing comes from its predictions alone; ``not tested`` — with ``why``),
  the chapter section (a MyST label) and the ids of the predictions that test it on a real model;
* ``predictions``: claim, statistic, comparison (``passes_if: ">= 0.6"``), the number of measurements
  ``n`` at each scale, its ``setting`` (``real model``, the default, or ``simulation`` for sampled
  synthetic data), the effect it expects (``effect``, with ``effect_source``: the paper's number or a
  stated minimal effect) and the value of the statistic's parameter when there is no effect
  (``no_effect``). Its power and false-pass rate at a size are
  computed by :func:`prefdyn.stats.pass_probability` (the closed form) and, for the run's own units,
  by simulating the statistic the chapter computed (:class:`prefdyn.stats.MeanWorld` and siblings).
  Each prediction also answers the three questions of the book's verdict rule
  (:func:`prefdyn.book.verify.prediction_status`):

  - ``null_world``: what the run would show if the paper's claim were false (the world whose
    simulated pass rate is the false-pass rate);
  - ``control``: a positive control measured in the same run (``claim``, ``statistic``,
    ``passes_if``) that shows the run *could* show the effect; required of real-model predictions;
  - ``implied_by``: where a checked identity forces the outcome (``identity``, the ``regime``
    statistic that decides whether the run is in that regime, ``implied_if``);
  - ``independence``: why the units are independent (real-model predictions);
  - ``version`` and ``reason``: a registration changed after it was first made is a new version
    (``version: 2``, …) with the reason for the change; runs of earlier versions stay visible,
    superseded.

The replication ledger (:mod:`prefdyn.book.ledger`) is rendered from these files and the runs; a
registration changed after the fact shows there with every version and its commit (from git).
"""
from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from ..stats import COMPARISONS, TESTS, pass_probability
from .runs import ChapterError, root

SCALES = ("smoke", "ci", "full")
SETTINGS = ("real model", "simulation")   # what a prediction is about: a real LLM's run, or sampled synthetic data
STATUSES = ("derived", "reconstructed", "empirical", "not tested")
ADEQUATE_POWER = 0.8       # a failure is evidence only at this power or more
MAX_FALSE_PASS = 0.05      # a pass is evidence only at this false-pass rate or less
CONTROL_KEYS = ("claim", "statistic", "passes_if")
IMPLIED_KEYS = ("identity", "regime", "implied_if")


class RegistryError(ChapterError):
    """A chapter's registry is missing, malformed or refers to something that does not exist."""


def comparison(text: str) -> tuple[str, float]:
    """``">= 0.6"`` -> ``(">=", 0.6)``."""
    symbol, threshold = str(text).split()
    return symbol, float(threshold)


def satisfies(observed: float, text: str) -> bool:
    """``observed`` satisfies the comparison ``text`` (``">= 0.6"``); NaN never does."""
    symbol, threshold = comparison(text)
    return bool(COMPARISONS[symbol](float(observed), threshold))


def _check_comparison(text, where: str, key: str) -> None:
    parts = str(text).split()
    if len(parts) != 2 or parts[0] not in COMPARISONS:
        raise RegistryError(f"{where}: {key} {text!r} must read '<symbol> <number>', symbol one of "
                            f"{', '.join(COMPARISONS)}")
    try:
        float(parts[1])
    except ValueError:
        raise RegistryError(f"{where}: {key} {text!r}: {parts[1]!r} is not a number") from None


@dataclass(frozen=True)
class Prediction:
    """A prediction registered before the run: it passes iff ``statistic passes_if`` on ``n`` measurements."""

    id: str
    claim: str
    statistic: str
    test: str
    passes_if: str
    n: dict
    units: str
    effect: float
    effect_source: str
    no_effect: float
    setting: str = "real model"
    null_world: str = ""
    control: dict | None = None        # {"claim", "statistic", "passes_if"}
    implied_by: dict | None = None     # {"identity", "regime", "implied_if"}
    independence: str = ""
    version: int = 1
    reason: str = ""

    @property
    def comparison(self) -> tuple[str, float]:
        return comparison(self.passes_if)

    def passes(self, observed: float) -> bool:
        """NaN never passes."""
        return satisfies(observed, self.passes_if)

    def control_passes(self, observed: float) -> bool:
        """The registered positive control is met by ``observed`` (NaN never is)."""
        return satisfies(observed, self.control["passes_if"])

    def implied(self, regime: float) -> bool:
        """The run is in the regime where a checked identity forces the outcome."""
        return satisfies(regime, self.implied_by["implied_if"])

    def power(self, n: int) -> float:
        """P(pass | the effect is ``effect``) with ``n`` measurements."""
        return pass_probability(self.test, int(n), self.effect, *self.comparison)

    def false_pass(self, n: int) -> float:
        """P(pass | no effect, ``no_effect``) with ``n`` measurements."""
        return pass_probability(self.test, int(n), self.no_effect, *self.comparison)

    def fingerprint(self) -> dict:
        """What may not change after a result has been seen."""
        return {k: v for k, v in asdict(self).items() if k != "id"}


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    where: str
    claim: str
    status: str
    section: str
    predictions: tuple[str, ...] = ()
    why: str = ""
    note: str = ""


@dataclass(frozen=True)
class Registry:
    chapter: str
    claims: tuple[Claim, ...]
    predictions: dict = field(default_factory=dict)   # id -> Prediction

    def prediction(self, pid: str) -> Prediction:
        if pid not in self.predictions:
            raise RegistryError(f"{self.chapter}: prediction {pid!r} is not registered in "
                                f"{registry_path(self.chapter)}; register it there before the run "
                                f"(registered: {', '.join(self.predictions) or 'none'})")
        return self.predictions[pid]


def claims_dir() -> Path:
    return root() / "chapters" / "claims"


def registry_path(chapter: str) -> Path:
    return claims_dir() / f"{chapter}.yml"


def _require(entry: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise RegistryError(f"{where}: missing {', '.join(missing)}")


def parse_prediction(pid: str, entry: dict, where: str) -> Prediction:
    where = f"{where}: prediction {pid!r}"
    if None in entry:
        raise RegistryError(f"{where}: write the no-effect value as `no_effect:` (YAML reads `null:` as an empty key)")
    _require(entry, ("claim", "statistic", "test", "passes_if", "n", "units", "effect", "effect_source", "no_effect"), where)
    if entry["test"] not in TESTS:
        raise RegistryError(f"{where}: test {entry['test']!r} is not one of {', '.join(TESTS)}")
    _check_comparison(entry["passes_if"], where, "passes_if")
    control, implied_by = entry.get("control"), entry.get("implied_by")
    for key, value, keys, rule in (("control", control, CONTROL_KEYS, "passes_if"),
                                   ("implied_by", implied_by, IMPLIED_KEYS, "implied_if")):
        if value is None:
            continue
        if not isinstance(value, dict) or set(value) != set(keys):
            raise RegistryError(f"{where}: {key} must have exactly the keys {', '.join(keys)}")
        _check_comparison(value[rule], where, f"{key}.{rule}")
    version = entry.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"{where}: version {version!r} must be a whole number >= 1")
    if version > 1 and not str(entry.get("reason", "")).strip():
        raise RegistryError(f"{where}: version {version} changes an earlier registration; give its `reason:`")
    setting = entry.get("setting", SETTINGS[0])
    if setting not in SETTINGS:
        raise RegistryError(f"{where}: setting {setting!r} is not one of {', '.join(SETTINGS)}")
    if set(entry["n"]) != set(SCALES):
        raise RegistryError(f"{where}: n must give the number of {entry['units']} at each of {', '.join(SCALES)}")
    return Prediction(pid, entry["claim"], entry["statistic"], entry["test"], str(entry["passes_if"]),
                      {s: int(entry["n"][s]) for s in SCALES}, entry["units"], float(entry["effect"]),
                      entry["effect_source"], float(entry["no_effect"]), setting,
                      str(entry.get("null_world", "")).strip(), control, implied_by,
                      str(entry.get("independence", "")).strip(), version, str(entry.get("reason", "")).strip())


def parse_registry(chapter: str, data: dict, where: str) -> Registry:
    predictions = {pid: parse_prediction(pid, e, where) for pid, e in (data.get("predictions") or {}).items()}
    papers = load_papers()
    claims = []
    for entry in data.get("claims") or []:
        _require(entry, ("id", "paper", "where", "claim", "status", "section"), f"{where}: claim")
        cw = f"{where}: claim {entry['id']!r}"
        if entry["paper"] not in papers:
            raise RegistryError(f"{cw}: paper {entry['paper']!r} is not in {claims_dir() / 'papers.yml'}")
        if entry["status"] not in STATUSES:
            raise RegistryError(f"{cw}: status {entry['status']!r} is not one of {', '.join(STATUSES)}")
        if entry["status"] == "not tested" and not entry.get("why"):
            raise RegistryError(f"{cw}: a claim that is not tested says why")
        unknown = [p for p in entry.get("predictions", []) if p not in predictions]
        if unknown:
            raise RegistryError(f"{cw}: predictions {unknown} are not registered")
        claims.append(Claim(entry["id"], entry["paper"], entry["where"], entry["claim"], entry["status"],
                            entry["section"], tuple(entry.get("predictions", [])), entry.get("why", ""),
                            entry.get("note", "")))
    return Registry(chapter, tuple(claims), predictions)


def load_papers() -> dict:
    """``papers.yml`` of this book: key -> {title, authors, venue, arxiv, readable}."""
    path = claims_dir() / "papers.yml"
    if not path.is_file():
        raise RegistryError(f"{path} is missing: it names the papers the chapters' claims come from")
    return _read_papers(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=None)
def _read_papers(path: str, mtime_ns: int) -> dict:
    return yaml.safe_load(Path(path).read_text())


def load_registry(chapter: str) -> Registry:
    """The chapter's registry as committed; a chapter without one raises, naming the file to write."""
    path = registry_path(chapter)
    if not path.is_file():
        raise RegistryError(f"{chapter}: no registry; write {path} (claims and predictions, see "
                            f"prefdyn.book.registry) before running the chapter")
    return parse_registry(chapter, yaml.safe_load(path.read_text()) or {}, str(path))


def registration_history(chapter: str) -> dict[str, list[dict]]:
    """For each prediction whose registration has changed in git, every version with its commit and
    date, oldest first (``[{"commit", "date", "registration"}]``); a prediction never changed is absent.
    Outside a git checkout the history is empty."""
    rel = registry_path(chapter).relative_to(root())
    try:
        log = subprocess.run(["git", "-C", str(root()), "log", "--format=%h %as", "--", str(rel)],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    versions: dict[str, list[dict]] = {}
    for line in reversed([x for x in log if x.strip()]):
        commit, date = line.split()
        text = subprocess.run(["git", "-C", str(root()), "show", f"{commit}:{rel}"], capture_output=True,
                              text=True, timeout=30).stdout
        try:
            reg = parse_registry(chapter, yaml.safe_load(text) or {}, f"{rel}@{commit}")
        except (RegistryError, yaml.YAMLError, ValueError):
            continue
        for pid, p in reg.predictions.items():
            seen = versions.setdefault(pid, [])
            if not seen or seen[-1]["registration"] != p.fingerprint():
                seen.append({"commit": commit, "date": date, "registration": p.fingerprint()})
    if registry_path(chapter).is_file():
        for pid, p in load_registry(chapter).predictions.items():
            seen = versions.get(pid)
            if seen and seen[-1]["registration"] != p.fingerprint():
                seen.append({"commit": "working tree", "date": "uncommitted", "registration": p.fingerprint()})
    return {pid: v for pid, v in versions.items() if len(v) > 1}
