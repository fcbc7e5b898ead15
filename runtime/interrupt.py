"""Ctrl-C before the command's handlers are in place: one line, exit 130, no traceback (nothing to clean up yet)."""

import os
import signal
import sys


def _quiet_exit(signum, frame) -> None:
    sys.stderr.write("diffrt: interrupted\n")
    os._exit(130)


def exit_quietly_on_ctrl_c() -> None:
    signal.signal(signal.SIGINT, _quiet_exit)
