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
from .reproduce import REFERENCE_LABEL
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
    """The live run of this build (if executed and ``live``) and every recorded run, each with a label,
    except the chapter's reference run (a ``smoke`` run kept for the tests, not evidence)."""
    runs = []
    meta = load_meta(chapter) if live else None
    if meta is not None:
        runs.append({**meta, **load_checks(chapter), **run_identity(meta), "label": "live"})
    return runs + [r for r in load_recorded_runs(chapter) if r["label"] != REFERENCE_LABEL]


def describe_run(run: dict) -> str:
    p = run.get("parameters", {})
    data = str(run.get("data") or "")     # a data_dir path (shown by its folder's name) or a recorded description
    data = ("the packaged data" if not data else data if any(ch.isspace() for ch in data)
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


def behaviour_set(run: dict) -> str:
    """Which persona behaviours a run used: ``development`` (the chapters' defaults), ``replication``
    (``behaviours="replication"``, the packaged behaviours no default touches) or ``other data``."""
    p = run.get("parameters") or {}
    if p.get("behaviours") == "replication":
        return "replication"
    if p.get("behaviours") not in (None, "development") or "data_dir" in p:
        return "other data"
    return "development"


def split_agreement(found: list[dict]) -> list[str]:
    """Per prediction, model and scale with current real-model results of recorded runs on both the
    development and the replication behaviours: the verdicts on each and whether they agree. Only
    adequately powered verdicts (reproduced, not reproduced) can agree or disagree; otherwise the
    line says why it cannot tell. Runs of different models or scales are never compared."""
    lines = []
    for pid in dict.fromkeys(e["prediction"] for e in found):
        sets: dict[tuple, dict[str, list[dict]]] = {}
        for e in found:
            if e["prediction"] == pid and e["setting"] == "real model" and not e["superseded"] \
                    and e["run"]["label"] != "live":
                where = (e["run"].get("model") or "unrecorded model", (e["run"].get("parameters") or {}).get("scale", "?"))
                sets.setdefault(where, {}).setdefault(behaviour_set(e["run"]), []).append(e)
        for (model, scale), by in sets.items():
            if not {"development", "replication"} <= by.keys():
                continue
            words = {k: {e["outcome"] for e in by[k]} for k in ("development", "replication")}
            decided = all(w <= {REPRODUCED, NOT_REPRODUCED} for w in words.values())
            judgement = ("the verdicts agree" if decided and words["development"] == words["replication"] else
                         "**the verdicts disagree**" if decided else
                         "cannot tell (a verdict is implied or inconclusive, so not evidence)")
            lines.append(f"- `{pid}` ({model}, {scale}): " + "; ".join(
                f"{k}: " + ", ".join(f"{verdict_term(e['status'])} (`{e['run']['label']}`)" for e in by[k])
                for k in ("development", "replication")) + f"; {judgement}")
    return lines


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


GLOSSARY = (
    ("reproduced", "a registered prediction passed, where a pass could not easily have happened by chance "
                   "(its false-pass rate, simulated from the run's own units, is at most 0.05), its positive "
                   "control was met and no identity forces the outcome: evidence for the paper's claim"),
    ("not reproduced", "a registered prediction failed, where the run could have shown the effect (its power, "
                       "simulated from the run's own units, is at least 0.8) and its positive control was met: "
                       "evidence against the claim, in that setting"),
    ("implied", "a checked identity forces the outcome in the regime the run measured (e.g. the first-order "
                "regime of chapter 2): the pass restates algebra and is not evidence about models"),
    ("inconclusive", "evidence neither way: a pass with a false-pass rate above 0.05, a failure with power "
                     "below 0.8, a positive control that failed (no headroom: the run could not have shown "
                     "the effect), or a registration missing what the rule needs; the reason is given"),
    ("superseded", "the result of an earlier version of a registration: shown, never counted"),
    ("power", "the probability that a prediction passes if the effect is as large as registered, "
              "simulated by re-running the chapter's own statistic on worlds built from the run's own units"),
    ("false-pass rate", "the probability that a prediction passes if the paper's claim is false (its null "
                        "world), simulated in the same way"),
    ("positive control", "a quantity measured in the same run that shows the run could have shown the effect "
                         "(training moved the loss, an oracle gains, the judge agrees with people)"),
    ("live run", "the execution of a chapter whose output the rendered page shows; every other finished "
                 "run is a recorded run (book/recorded/)"),
)


def glossary() -> str:
    """The verdict words, as a Sphinx glossary: ``{term}`reproduced``` links here from any page."""
    return "```{glossary}\n" + "\n\n".join(f"{word}\n  {meaning}." for word, meaning in GLOSSARY) + "\n```"


def verdict_term(status: str) -> str:
    """A check's status with its verdict word linked to the glossary."""
    word = outcome(status)
    term = "implied" if word == IMPLIED else word
    rest = status[len(word):] if status.startswith(word) else ""
    if term not in dict(GLOSSARY):
        return status
    return f"{{term}}`{word} <{term}>`" + (rest if status.startswith(word) else f" ({status})")


def scope(rows: list[dict]) -> str:
    """One sentence: which models and scales the real-model evidence comes from."""
    runs = {(e["run"].get("model") or "unrecorded model", (e["run"].get("parameters") or {}).get("scale", "?"))
            for r in rows for e in r["evidence"] if e["setting"] == "real model" and not e["superseded"]}
    if not runs:
        return "No real-model run of the current registrations is recorded yet."
    models = sorted({m for m, _ in runs})
    scales = sorted({s for _, s in runs})
    text = (f"All real-model evidence below comes from runs of {', '.join(f'`{m}`' for m in models)} at scale "
            f"{', '.join(f'`{s}`' for s in scales)}")
    if "full" not in scales:
        text += (" on a 2-core CPU: small models, short training and small held-out sets. A `full` run (paper-like "
                 "sizes, on a GPU) would give the underpowered predictions the power they lack; it would not turn "
                 "a 135M or 270M model into the 7B models of the papers")
    return text + "."


def prediction_rows(claim, found: list[dict], registry, scale: str = "ci") -> list[list[str]]:
    """One row per registered prediction of the claim: what it tests, its rule, its size, and its current
    verdict in each run (grouped by model)."""
    out = []
    for pid in claim.predictions:
        p = registry.prediction(pid)
        here = [e for e in found if e["prediction"] == pid and not e["superseded"]]
        verdicts = "<br>".join(
            f"{e['run'].get('model') or 'unrecorded model'}, `{e['run']['label']}`: {verdict_term(e['status'])} "
            f"(measured {fmt(e['observed'])}; power {e['power']:.2f}, false-pass {e['false_pass'] or 0:.3f}"
            f"{control_text(e).replace('; control', ', control')})"
            for e in sorted(here, key=lambda e: (e["run"].get("model") or "", e["run"]["label"]))) or "not run yet"
        out.append([f"`{pid}` v{p.version}" + (" *(simulation)*" if p.setting == "simulation" else ""),
                    f"{p.statistic}; passes if {p.passes_if}", f"{p.n[scale]} {p.units.split(' (')[0]}", verdicts])
    return out


def later_lines(claim_id: str) -> list[str]:
    """The later work bearing on the claim (``chapters/claims/later-work.yml``; none where the book has no such file)."""
    from .later import later_for, later_work_path

    if not later_work_path().is_file():
        return []
    return [f"- {{cite:t}}`{w.paper.key}` ({w.relation}): {w.finding}" +
            (f" Tested in {{ref}}`{w.section}`." if w.section else "") for w in later_for(claim_id)]


def ledger_markdown(chapters: list[str] | None = None) -> str:
    chapters = chapters or chapter_ids()
    rows, papers = ledger_rows(chapters), load_papers()
    registries = {ch: load_registry(ch) for ch in chapters}
    out = ["# Replication ledger", "",
           "What this book has shown about each claim of the papers it treats. The page is rendered by "
           "`prefdyn book` from the claims and the predictions each chapter registers before it runs "
           "(`chapters/claims/<chapter>.yml`) and from the runs of this build and the recorded runs "
           "(`book/recorded/`); nothing on it is typed by hand. A claim is {term}`reproduced` only "
           "where a registered prediction passed at a {term}`false-pass rate` of at most 0.05 (simulated from the "
           "run's own units), with its {term}`positive control` met and no identity forcing the outcome; a "
           "prediction that failed at a {term}`power` of at least 0.8, its control met, is {term}`not reproduced`; "
           "everything else is {term}`implied` or {term}`inconclusive` and counts as evidence neither way, and "
           "results of an earlier version of a registration are {term}`superseded`. Each prediction's verdicts "
           "are split by the model of each run, so that a property of one model is not read as a property of DPO. "
           + scope(rows), "", "## The verdict words", "", glossary(), ""]
    for key, paper in papers.items():
        mine = [r for r in rows if r["paper"] == key]
        if not mine:
            continue
        out += [f"## {paper['title']}", "",
                f"{paper['authors']}, {paper['venue']} (arXiv {paper['arxiv']}). What of it can be read here: "
                f"{paper['readable']}.", "",
                markdown_table(["claim", "this book", "section"],
                               [[f"{{ref}}`{r['claim'].id} <claim-{r['claim'].id}>`", r["short"], f"{{ref}}`{r['claim'].section}`"]
                                for r in mine]), ""]
        for r in mine:
            c = r["claim"]
            declared = DECLARED[c.status] + (f": {c.why}" if c.status == "not tested" else "")
            out += [f"(claim-{c.id})=", f"### `{c.id}`", "",
                    f"*Claim:* {c.claim}. *Where:* {c.where}." + (f" *Note:* {c.note}." if c.note else "")
                    + (f" *Status:* {declared}." if declared else ""), ""]
            if c.predictions:
                out += [markdown_table(["prediction", "statistic; rule", "n at ci", "verdict in each run"],
                                       prediction_rows(c, r["evidence"], registries[r["chapter"]])), ""]
            agreement = split_agreement(r["evidence"])
            if agreement:
                out += ["On the development behaviours and on the replication behaviours the book was never "
                        "developed on:", ""] + agreement + [""]
            later = later_lines(c.id)
            if later:
                out += ["Later work:", ""] + later + [""]
            old = [e for e in r["evidence"] if e["superseded"]]
            if old:
                out += [folded(f"Superseded results ({len(old)})", "\n".join(
                    f"- `{e['prediction']}` v{e['version']} in `{e['run']['label']}`: {e['status']}" for e in old)), ""]
    out += ["## Registrations changed after they were made", "",
            "Each change is a new version with its reason; results of earlier versions stay visible, superseded, "
            "under their claim.", ""]
    changed = [(ch, pid, v) for ch in chapters for pid, v in registration_history(ch).items()]
    if not changed:
        out.append("No registered prediction has been changed since it was first committed.")
    runs_by_chapter = {ch: chapter_runs(ch, live=False) for ch in chapters}
    for chapter, pid, versions in changed:
        out.append(f"- `{chapter}` / `{pid}`:")
        for v in versions:
            reg = v["registration"]
            before = sorted({r["label"] for r in runs_by_chapter[chapter] for c in r["checks"]
                             if c.get("prediction") and c["prediction"]["id"] == pid
                             and c["prediction"].get("version", 1) < reg.get("version", 1)})
            out.append(f"  - {v['commit']} ({v['date']}): version {reg.get('version', 1)}, passes if `{reg['passes_if']}`, "
                       f"n {reg['n']}, effect {reg['effect']}" + (f"; reason: {reg['reason']}" if reg.get("reason") else "")
                       + (f"; recorded runs of earlier versions: {', '.join(f'`{b}`' for b in before)}" if before else ""))
    out += ["", "## The runs", "", folded("Every run this page cites, once", "\n".join(
        f"- {ch}: {describe_run(run)}" for ch in chapters
        for run in chapter_runs(ch))), ""]
    return "\n".join(out) + "\n"


def folded(title: str, body: str) -> str:
    """A block the reader opens on demand (sphinx-design's dropdown)."""
    return f":::{{dropdown}} {title}\n{body}\n:::"


README_START, README_END = "<!-- ledger-headline: start -->", "<!-- ledger-headline: end -->"


def claim_verdict(r: dict) -> tuple[str, str, str]:
    """A claim's verdict in a few words, its key number and the models and scales it rests on, from
    its current real-model evidence (else its simulations, else its declared status)."""
    c, found = r["claim"], [e for e in r["evidence"] if not e["superseded"]]
    real = [e for e in found if e["setting"] == "real model"]
    pool = real or found
    words = [w for w in (REPRODUCED, NOT_REPRODUCED, IMPLIED, INCONCLUSIVE) if any(e["outcome"] == w for e in pool)]
    if not pool:
        verdict = DECLARED.get(c.status) or ("predictions not run" if c.predictions else "not tested")
        return verdict, "—", "—"
    counted = [w for w in words if w in (REPRODUCED, NOT_REPRODUCED)]
    verdict = " and ".join(counted) if counted else (words[0] if words else "—")
    verdict = (verdict.replace(IMPLIED, "implied by an identity") + ("" if real else " in simulation"))
    key = next((e for w in (NOT_REPRODUCED, REPRODUCED, IMPLIED, INCONCLUSIVE) for e in pool if e["outcome"] == w))
    number = f"`{key['prediction']}` {fmt(key['observed'])} (passes if {key['passes_if']})"
    where = sorted({f"{e['run'].get('model') or '?'} {(e['run'].get('parameters') or {}).get('scale', '?')}"
                    for e in real}) or ["simulation"]
    return verdict, number, ", ".join(where)


def recorded_headline(chapters: list[str] | None = None, compact: bool = False) -> str:
    """What the book has and has not reproduced, per paper, from the registries and the runs recorded
    with it (never a live run, so the text is the same on every machine): the landing page's verdict
    tables, or (``compact``) the README's first screen."""
    rows = ledger_rows(chapters, live=False)
    papers = load_papers()
    out = [scope(rows), ""]
    for key, paper in papers.items():
        mine = [r for r in rows if r["paper"] == key]
        if not mine:
            continue
        verdicts = [(r, *claim_verdict(r)) for r in mine]
        if compact:
            groups: dict[str, list[str]] = {}
            for r, verdict, *_ in verdicts:
                groups.setdefault(verdict, []).append(f"`{r['claim'].id}`")
            out.append(f"- **{paper['title']}** (arXiv {paper['arxiv']}): " +
                       "; ".join(f"{verdict}: {', '.join(ids)}" for verdict, ids in groups.items()))
            continue
        tested = [v for v in verdicts if v[0]["claim"].status != "not tested"]
        untested = [v for v in verdicts if v[0]["claim"].status == "not tested"]
        out += [f"**{paper['title']}** ({paper['authors']}, arXiv {paper['arxiv']})", ""]
        if tested:
            out += [markdown_table(["claim", "verdict", "key number", "rests on"],
                                   [[f"{{ref}}`{r['claim'].id} <claim-{r['claim'].id}>`", v, n, w] for r, v, n, w in tested]), ""]
        if untested:
            out += ["Not tested here: " + "; ".join(f"`{r['claim'].id}` ({r['claim'].why})" for r, *_ in untested), ""]
    if compact:
        failed = sorted({f"`{e['prediction']}` in `{e['run']['label']}` (measured {fmt(e['observed'])}, passes if "
                         f"{e['passes_if']}{control_text(e)})" for r in rows for e in of_kind(r["evidence"], NOT_REPRODUCED, "real model")})
        out += ["", "Not reproduced on a real LLM, with the control that shows the run could have shown it: " +
                ("; ".join(failed) or "none") + "."]
    return "\n".join(out).rstrip()


def update_readme(path: Path) -> bool:
    """Rewrite the README's headline block from :func:`recorded_headline`; ``True`` if it changed."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} … {README_END} block")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{recorded_headline(compact=True)}\n{README_END}{tail}"
    if new != text:
        atomic_write(path, new)
    return new != text


def write_ledger_page() -> Path:
    """Write the ledger next to the executed notebooks (``book/_executed/ledger.md``), and the
    headline of the recorded runs that the introduction includes (``book/_executed/headline.md``,
    the same text as the README's first screen)."""
    atomic_write(executed_dir() / HEADLINE_PAGE, recorded_headline() + "\n")
    return atomic_write(executed_dir() / PAGE, ledger_markdown())
