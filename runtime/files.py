"""File modes: what a plain create would give under the process's umask (mkstemp and mkdtemp give 0600 / 0700)."""

from __future__ import annotations

import os


def ordinary_mode(base: int) -> int:
    """base (0o666 for files, 0o777 for folders) less the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask
