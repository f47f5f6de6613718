"""``python -m fastntk ...``: the ``fastntk`` command line (``demo`` included)."""

import sys

if __name__ == "__main__":
    try:  # Ctrl-C while the command line loads (torch) or starts: one line, status 130
        from fastntk.cli import entry

        code = entry()
    except KeyboardInterrupt:
        cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        print(f"\nfastntk{' ' + cmd if cmd else ''}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
