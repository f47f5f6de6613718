"""The scatter plot of ``fastntk evaluate --plot``, drawn with matplotlib.

matplotlib is an optional dependency (``pip install fastntk[plot]``): :func:`require`
checks for it before a command computes anything. The figure is drawn on matplotlib's
Agg canvas directly (no ``pyplot``), so plotting neither picks nor changes the backend
of a program that imports fastntk.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastntk.errors import UnsupportedError

__all__ = ["require", "scatter"]

FIGSIZE = (6.0, 4.5)  # inches
DPI = 100  # the PNG is FIGSIZE * DPI pixels: 600 x 450


def require() -> None:
    """UnsupportedError (one line: how to install it) unless matplotlib can be imported."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise UnsupportedError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install fastntk[plot])"
        ) from None


def scatter(
    path: str, x: Sequence[float], y: Sequence[float], *, xlabel: str, ylabel: str, title: str
):
    """Write the scatter plot of ``(x, y)`` to ``path`` as a PNG; non-finite points are left
    out. Returns the ``matplotlib.figure.Figure`` (for inspection; it is already saved).

    Args:
        path: the PNG file.
        x: (N,) the metric's values (oriented: higher predicts better).
        y: (N,) the accuracies.
        xlabel, ylabel, title: the axes' labels and the figure's title.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x[ok], y[ok], s=12, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return fig
