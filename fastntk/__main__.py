"""``python -m fastntk demo`` runs the demo; anything else goes to the ``fastntk`` CLI."""

import sys


def _main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["demo"]:
        from fastntk.demo import main

        return main(argv[1:])
    try:
        from fastntk.cli import main as cli_main
    except ImportError:
        print("usage: python -m fastntk demo [--n N] [--arch STR]", file=sys.stderr)
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(_main())
