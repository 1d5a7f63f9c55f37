"""Figures that read at the size the book shows them.

The book's text column is about 780 px wide. A PNG wider than that is scaled down, and its tick
labels with it; so every figure is drawn at most :data:`COLUMN_INCHES` wide at :data:`DPI` (shown at
its natural size) with at most two panels per row (:func:`panels`), and with fonts that stay legible
(:func:`use_book_style`, applied by :func:`prefdyn.experiments.start`).
"""
from __future__ import annotations

import math

DPI = 100
COLUMN_INCHES = 7.6        # 760 px at DPI: the figure is shown at its natural width
MAX_PER_ROW = 2
STYLE = {"figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 8.5, "figure.constrained_layout.use": True}


def use_book_style() -> None:
    """Set matplotlib's defaults for the book's figures (size of text, resolution, layout)."""
    import matplotlib as mpl

    mpl.rcParams.update(STYLE)


def panels(n: int, height: float = 3.0, **subplot_kw):
    """A figure of ``n`` panels, at most two per row, as wide as the book's column: ``(fig, axes)``
    with ``axes`` a flat list of the ``n`` axes (unused cells of the last row are removed)."""
    import matplotlib.pyplot as plt

    if n < 1:
        raise ValueError("a figure needs at least one panel")
    cols = min(n, MAX_PER_ROW)
    rows = math.ceil(n / cols)
    width = COLUMN_INCHES if cols > 1 else min(COLUMN_INCHES, 5.2)
    fig, grid = plt.subplots(rows, cols, figsize=(width, height * rows), squeeze=False, **subplot_kw)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]
