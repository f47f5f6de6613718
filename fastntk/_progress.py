"""The progress bars of fastntk (the engine's chunks, a search's evaluations): tqdm.

One rule for every bar: ``show=True`` draws it, ``show=False`` does not, and
``show=None`` draws it only where its stream is a terminal, so a log file or a pipe gets
no carriage-return frames. The rate is always shown as units per second (``eval/s``,
``chunk/s``), never inverted to seconds per unit, so a bar reads the same at any speed.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["bar"]

_WITH_TOTAL = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
_WITHOUT_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"


class _Bar(tqdm):
    """A tqdm bar that an exception left open is dropped silently when collected: tqdm
    would close it then, writing its last frame after the caller's error message."""

    def __del__(self) -> None:
        self.disable = True  # (close() then writes nothing)
        super().__del__()


def bar(
    total: int | None,
    desc: str,
    unit: str,
    show: bool | None = None,
    *,
    file: TextIO | None = None,
    postfix: str | None = None,
) -> tqdm:
    """A progress bar on ``file`` (default: ``sys.stderr`` as it is now).

    Args:
        total: the number of steps (None: unknown, no bar, a count).
        desc: the label before the bar.
        unit: what one step is (``"eval"``, ``"chunk"``).
        show: True: shown; False: not; None: shown where ``file`` is a terminal.
        file: the text stream written to.
        postfix: text after the rate (``bar.set_postfix_str`` changes it).

    Returns:
        The ``tqdm`` bar: ``update()`` after each step, ``close()`` at the end (it leaves
        the last frame and a newline on the stream).
    """
    return _Bar(
        total=total, desc=desc, unit=unit, file=sys.stderr if file is None else file,
        disable=None if show is None else not show, leave=True, dynamic_ncols=True,
        mininterval=0.2, postfix=postfix,
        bar_format=_WITH_TOTAL if total else _WITHOUT_TOTAL,
    )  # fmt: skip
