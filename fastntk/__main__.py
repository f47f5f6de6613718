"""``python -m fastntk demo`` runs the demo; anything else goes to the ``fastntk`` CLI."""

import sys


def _main() -> int:
    argv = sys.argv[1:]
    from fastntk.cli import tune_own_process

    tune_own_process()
    if argv[:1] == ["demo"]:
        from fastntk.demo import main

        return main(argv[1:])
    from fastntk.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(_main())
