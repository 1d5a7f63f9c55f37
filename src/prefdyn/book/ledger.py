"""The replication ledger: for each paper, each of its claims and what this book has shown about it.

Rendered at build time (:func:`prefdyn.book.build.build_book`) from what the chapters declare — their
registries, ``chapters/claims/<id>.yml`` (:mod:`prefdyn.book.registry`) — and from the runs: the
live run of this build (``book/_executed/<id>.checks.json``) and every recorded run
(``book/recorded/<id>/<label>.json``). Nothing on the page is typed by hand. A claim's standing is

* ``derived, checked exactly`` or ``reconstructed`` (the paper's statement could not be read; the
  book's own version), as the chapter declares;
* ``reproduced on a real LLM`` only where some run holds a *reproduced* prediction of the claim
  about a real model (:func:`prefdyn.book.verify.prediction_status`: passed at a simulated
  false-pass rate ≤ 0.05, its positive control met, not implied by an identity), naming the runs;
  ``reproduced in simulation`` for one about sampled synthetic data;
* ``not reproduced`` (on a real LLM, or in simulation) where a prediction failed at simulated power
  ≥ 0.8 with its control met, with its numbers and the control beside them;
* ``implied by <identity>`` and ``inconclusive (…)`` results are listed, never counted;
* results of an earlier version of a registration are *superseded*: shown, never counted;
* ``not tested``, with the chapter's reason.
"""
from __future__ import annotations

from pathlib import Path

from ..store import atomic_write
from .registry import load_papers, load_registry, registration_history
from .glue import markdown_table
from .runs import chapter_ids, executed_dir, load_checks, load_meta, load_recorded_runs, run_identity
from .verify import IMPLIED, INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, fmt, outcome

HEADLINE_PAGE = "headline.md"   # included by book/intro.md
PAGE = "ledger.md"
DECLARED = {"derived": "derived, checked exactly", "reconstructed": "reconstructed (the book's own statement)",
            "empirical": "", "not tested": "not tested"}
EVIDENCE = ((REPRODUCED, "real model", "reproduced on a real LLM"),   # (outcome, setting, phrase), by weight
            (REPRODUCED, "simulation", "reproduced in simulation"),
            (NOT_REPRODUCED, "real model", "not reproduced on a real LLM"),
            (NOT_REPRODUCED, "simulation", "not reproduced in simulation"))


def chapter_runs(chapter: str, live: bool = True) -> list[dict]:
    """The live run of this build (if executed and ``live``) and every recorded run, each with a label."""
    runs = []
    meta = load_meta(chapter) if live else None
    if meta is not None:
        runs.append({**meta, **load_checks(chapter), **run_identity(meta), "label": "live"})
    return runs + load_recorded_runs(chapter)


def describe_run(run: dict) -> str:
    p = run.get("parameters", {})
    data = str(run.get("data") or "")     # a data_dir path (shown by its folder's name) or a recorded description
    data = ("the book's data" if not data else data if any(ch.isspace() for ch in data)
            else f"data `{Path(data).name}/`")
    return (f"`{run['label']}` ({p.get('scale', '?')}, {run.get('model') or 'default model'}, {data}, "
            f"{run.get('hardware') or 'unrecorded hardware'})")


def evidence(claim, runs: list[dict], registry) -> list[dict]:
    """Every result of one of the claim's predictions in one of the runs (its setting, real model or
    simulation, as the run saved it, else as registered); a result of an earlier version of the
    registration (runs before versions were numbered count as version 1) is ``superseded``."""
    out = []
    for run in runs:
        for c in run["checks"]:
            if c.get("prediction") and c["prediction"]["id"] in claim.predictions:
                pid, p = c["prediction"]["id"], c["prediction"]
                out.append({"run": run, "prediction": pid, "status": c["status"], "outcome": outcome(c["status"]),
                            "setting": p.get("setting") or registry.prediction(pid).setting,
                            "observed": c["observed"], "passes_if": c["tolerance"],
                            "power": p["power"], "false_pass": p.get("false_pass"), "n": p["n"],
                            "control": p.get("control"), "version": p.get("version", 1),
                            "superseded": p.get("version", 1) != registry.prediction(pid).version})
    return out


def of_kind(found: list[dict], result: str, setting: str) -> list[dict]:
    """The current (not superseded) evidence with this outcome (``reproduced`` / ``not reproduced``)
    in this setting."""
    return [e for e in found if e["outcome"] == result and e["setting"] == setting and not e["superseded"]]


def control_text(e: dict) -> str:
    """``; control: <claim> 0.12 (>= 0.05, met)`` or nothing."""
    c = e.get("control")
    return f"; control: {c['claim']} {fmt(c['observed'])} ({c['passes_if']}, {'met' if c['passed'] else 'NOT met'})" \
        if c else ""


def standing(claim, found: list[dict]) -> list[str]:
    """The claim's status phrases, most important first (see the module docstring)."""
    out = []
    for result, setting, phrase in EVIDENCE:
        here = of_kind(found, result, setting)
        if here:
            out.append(f"**{phrase}**: " + "; ".join(
                f"`{e['prediction']}` in {describe_run(e['run'])}" + ("" if result == REPRODUCED else
                f": measured {fmt(e['observed'])}, passes if {e['passes_if']}, power {e['power']:.2f}")
                + control_text(e) for e in here))
    current = [e for e in found if not e["superseded"]]
    for word, phrase in ((IMPLIED, "implied by a checked identity in the measured regime (not evidence)"),
                         (INCONCLUSIVE, "inconclusive (no evidence either way)")):
        weak = [e for e in current if e["outcome"] == word]
        if weak:
            out.append(f"{phrase}: " + "; ".join(
                f"`{e['prediction']}` in `{e['run']['label']}` ({e['status']}, power {e['power']:.2f} at n = {e['n']})"
                for e in weak))
    old = [e for e in found if e["superseded"]]
    if old:
        out.append("superseded (results of an earlier registration, not counted): " + "; ".join(
            f"`{e['prediction']}` v{e['version']} in `{e['run']['label']}` ({e['status']})" for e in old))
    if DECLARED[claim.status]:
        out.insert(0, DECLARED[claim.status] + (f": {claim.why}" if claim.status == "not tested" else ""))
    if claim.predictions and not found:
        out.append("its predictions have not been run in this build")
    if not out:
        out.append("not tested: no run holds its predictions")
    return out


def short_standing(claim, found: list[dict]) -> str:
    """The standing in a few words for the summary table: the declared status and, per outcome,
    the labels of the runs (the details follow the table)."""
    parts = [claim.status] if claim.status != "empirical" else []
    for result, setting, phrase in EVIDENCE:
        labels = sorted({e["run"]["label"] for e in of_kind(found, result, setting)})
        if labels:
            parts.append(f"**{phrase}** ({', '.join(labels)})")
    if any(e["outcome"] == IMPLIED and not e["superseded"] for e in found):
        parts.append("implied by an identity")
    if any(e["outcome"] == INCONCLUSIVE and not e["superseded"] for e in found):
        parts.append("inconclusive runs")
    if claim.predictions and not found:
        parts.append("predictions not run")
    return "; ".join(parts) or "not tested"


def by_model(found: list[dict]) -> str:
    """Per model, the outcomes of the claim's real-model predictions in its runs: ``model: reproduced
    (labels); not reproduced (labels)``, models in the order their runs come; ``—`` where no run on a
    real model holds one of its predictions. Runs recorded without a model name count under
    ``unrecorded model``."""
    models: dict[str, dict[str, set]] = {}
    for e in found:
        if e["setting"] == "real model" and not e["superseded"]:
            outcomes = models.setdefault(e["run"].get("model") or "unrecorded model", {})
            outcomes.setdefault(e["outcome"].replace(IMPLIED, "implied"), set()).add(e["run"]["label"])
    return "; ".join(f"{model}: " + ", ".join(f"{result} ({', '.join(sorted(labels))})"
                                              for result, labels in sorted(outcomes.items()))
                     for model, outcomes in models.items()) or "—"


def ledger_rows(chapters: list[str] | None = None, live: bool = True) -> list[dict]:
    """One row per declared claim: paper, chapter, where, what, standing and evidence (from the live
    run of this build too, unless ``live`` is false: then from the recorded runs alone)."""
    rows = []
    for chapter in chapters or chapter_ids():
        registry, runs = load_registry(chapter), chapter_runs(chapter, live)
        for claim in registry.claims:
            found = evidence(claim, runs, registry)
            rows.append({"paper": claim.paper, "chapter": chapter, "claim": claim, "evidence": found,
                         "standing": standing(claim, found), "short": short_standing(claim, found),
                         "models": by_model(found)})
    return rows


def ledger_markdown(chapters: list[str] | None = None) -> str:
    chapters = chapters or chapter_ids()
    rows, papers = ledger_rows(chapters), load_papers()
    out = ["# Replication ledger", "",
           "What this book has shown about each claim of the papers it treats. The page is rendered by "
           "`prefdyn book` from the claims and the predictions each chapter registers before it runs "
           "(`chapters/claims/<chapter>.yml`) and from the runs of this build and the recorded runs "
           "(`book/recorded/`); nothing on it is typed by hand. A claim is *reproduced on a real LLM* only "
           "where a registered prediction passed at a false-pass rate of at most 0.05 (simulated from the "
           "run's own units), with its positive control met and no identity forcing the outcome; a "
           "prediction that failed at a power of at least 0.8, its control met, is *not reproduced*; "
           "everything else is *implied* or *inconclusive* and counts as evidence neither way, and "
           "results of an earlier version of a registration are *superseded*. The column *by model* splits the "
           "real-model outcomes by the model each run used, so that a property of one model is not read as "
           "a property of DPO.", ""]
    for key, paper in papers.items():
        mine = [r for r in rows if r["paper"] == key]
        if not mine:
            continue
        out += [f"## {paper['title']}", "",
                f"{paper['authors']}, {paper['venue']} (arXiv {paper['arxiv']}). What of it can be read here: "
                f"{paper['readable']}.", "",
                markdown_table(["claim", "what it claims", "this book", "by model (real-model predictions)", "section"],
                               [[f"`{r['claim'].id}`", r["claim"].claim, r["short"], r["models"],
                                 f"{{ref}}`{r['claim'].section}`"]
                                for r in mine]),
                "", "Each claim in detail:", ""]
        for r in mine:
            c = r["claim"]
            out.append(f"`{c.id}`\n: *Where:* {c.where}. *Claim:* {c.claim}." + (f" *Note:* {c.note}." if c.note else "")
                       + "\n\n  " + "\n  ".join(f"- {s}" for s in r["standing"]) + "\n")
        out.append("")
    changed = [(ch, pid, v) for ch in chapters for pid, v in registration_history(ch).items()]
    out += ["## Registrations changed after they were made", ""]
    if not changed:
        out.append("No registered prediction has been changed since it was first committed.")
    for chapter, pid, versions in changed:
        out += [f"- `{chapter}` / `{pid}`:"] + [
            f"  - {v['commit']} ({v['date']}): version {v['registration'].get('version', 1)}, passes if "
            f"`{v['registration']['passes_if']}`, n {v['registration']['n']}, effect {v['registration']['effect']}"
            + (f"; reason: {v['registration']['reason']}" if v['registration'].get('reason') else "")
            for v in versions]
    return "\n".join(out) + "\n"


README_START, README_END = "<!-- ledger-headline: start -->", "<!-- ledger-headline: end -->"


def recorded_headline(chapters: list[str] | None = None) -> str:
    """What the book has and has not reproduced, from the registries and the runs recorded with it
    (never a live run, so the text is the same on every machine): the README's first screen."""
    rows = ledger_rows(chapters, live=False)
    declared = {k: sum(r["claim"].status == k for r in rows) for k in ("derived", "reconstructed", "empirical", "not tested")}

    reproduced = sorted(f"`{r['claim'].id}` ({', '.join(sorted({e['run']['label'] for e in here}))})"
                        for r in rows if (here := of_kind(r["evidence"], REPRODUCED, "real model")))

    def failed(setting: str) -> str:
        results = {f"`{e['prediction']}` in `{e['run']['label']}` (measured {fmt(e['observed'])}, passes if "
                   f"{e['passes_if']}{control_text(e)})": None for r in rows
                   for e in of_kind(r["evidence"], NOT_REPRODUCED, setting)}   # a prediction may test two claims
        return "; ".join(results) or "none"

    untested = sum(1 for r in rows if r["claim"].predictions and not any(
        e["outcome"] in (REPRODUCED, NOT_REPRODUCED) and not e["superseded"] for e in r["evidence"]))
    out = [f"The chapters list {len(rows)} claims of the papers: {declared['derived']} derived and checked exactly, "
           f"{declared['reconstructed']} reconstructed (the paper's statement could not be read; the book states "
           f"its own), {declared['empirical']} empirical (about models and data only), {declared['not tested']} not "
           "tested (each with its reason). In the runs recorded with the book:",
           "", "- **reproduced on a real LLM**: " + ("; ".join(reproduced) or "none"),
           "- **not reproduced on a real LLM**: " + failed("real model"),
           "- **not reproduced in simulation**: " + failed("simulation"),
           f"- {untested} claims with registered predictions have no adequately powered recorded run yet."]
    return "\n".join(out)


def update_readme(path: Path) -> bool:
    """Rewrite the README's headline block from :func:`recorded_headline`; ``True`` if it changed."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} … {README_END} block")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{recorded_headline()}\n{README_END}{tail}"
    if new != text:
        atomic_write(path, new)
    return new != text


def write_ledger_page() -> Path:
    """Write the ledger next to the executed notebooks (``book/_executed/ledger.md``), and the
    headline of the recorded runs that the introduction includes (``book/_executed/headline.md``,
    the same text as the README's first screen)."""
    atomic_write(executed_dir() / HEADLINE_PAGE, recorded_headline() + "\n")
    return atomic_write(executed_dir() / PAGE, ledger_markdown())
