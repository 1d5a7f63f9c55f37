"""Numbers, text, tables and figures handed from a chapter's code to its prose, through myst-nb's
``glue``: the book's text cites a run's outcome instead of typing it."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def table_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell (``|`` escaped, one line)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, every cell escaped: the one way the book writes tables (glue it, never print it)."""
    lines = ["| " + " | ".join(table_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(table_cell(c) for c in row) + " |")
    return "\n".join(lines)


def glue_markdown(name: str, text: str) -> None:
    """Make Markdown text available to the book as ``{glue:md}`name```."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(text), display=False)


def glue_figure(name: str, fig) -> None:
    """Make a matplotlib figure available to the book as ``{glue:figure} name``."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


def glue_value(name: str, value: Any) -> None:
    """Make a number or short text available as ``{glue:text}`name```."""
    from myst_nb import glue

    glue(name, value, display=False)


def glue_table(name: str, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> None:
    """Make a table available as ``{glue:md}`name``` (with ``:format: myst``), never printed."""
    glue_markdown(name, markdown_table(header, rows))


FINDINGS_ORDER = ("not reproduced", "inconclusive", "implied by", "reproduced")   # what a reader needs first


def _rank(status: str) -> int:
    """A verdict's place in :data:`FINDINGS_ORDER` (statuses of the earlier rule read as inconclusive)."""
    return next((i for i, word in enumerate(FINDINGS_ORDER) if status.startswith(word)), 1)


def glue_findings(name: str, verification, sentences: dict[str, str]) -> None:
    """Glue, as ``{glue:md}`name```, one sentence per registered prediction checked in
    ``verification`` (``sentences``: prediction id -> what the run measured), each ending with its
    verdict in bold; not reproduced and inconclusive ones first (:data:`FINDINGS_ORDER`), then in
    the order given. Every prediction checked must have a sentence, and every sentence a check."""
    status = {c.prediction["id"]: c.status for c in verification.checks if c.prediction}
    if set(status) != set(sentences):
        raise ValueError(f"findings: sentences for {sorted(sentences)}, predictions checked {sorted(status)}")
    ordered = sorted(sentences, key=lambda pid: _rank(status[pid]))
    glue_markdown(name, "\n".join(f"- {sentences[pid].rstrip('.')} (`{pid}`): **{status[pid]}**."
                                   for pid in ordered))
