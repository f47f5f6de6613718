"""``python -m fastntk ...``: the ``fastntk`` command line (``demo`` included)."""

import sys

from fastntk.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
