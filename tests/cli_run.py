"""What the command-line tests share: an architecture, synthetic data, a CLI run (the
narrow NB201 space is the ``tiny_nb201`` fixture of conftest.py)."""

from __future__ import annotations

from fastntk import cli

ARCH = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|"
    "avg_pool_3x3~2|"
)
DATA = ["--data", "synthetic", "--batch-size", "8"]


def run(capsys, *argv):
    """``fastntk`` with ``argv``: (exit status, stdout, stderr)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err
