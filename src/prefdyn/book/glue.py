"""Numbers, text, tables and figures handed from a chapter's code to its prose, through myst-nb's
``glue``: the book's text cites a run's outcome instead of typing it."""
from __future__ import annotations

from typing import Any


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
