"""The ``kdiff-align`` command's entry point: Ctrl-C while the libraries load is one line, not a traceback.

It sits outside the ``kdiff_align`` package because importing any module of the package first runs the
package's imports (torch and the rest, seconds of start-up); the handler must be in place before them.
"""
import os
import signal
import sys


def interrupted_while_starting(signum, frame) -> None:
    """SIGINT during start-up: one line, exit status 130 (nothing has been written yet)."""
    sys.stderr.write("kdiff-align: interrupted while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def main(argv=None) -> int:
    """Install the start-up handler, import the command line, then run it with Python's usual Ctrl-C."""
    signal.signal(signal.SIGINT, interrupted_while_starting)
    from kdiff_align.apps.cli import main as run
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
