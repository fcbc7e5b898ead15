"""Handing back the pages of a graph's weight files that OpenVINO maps and no longer reads.

OpenVINO maps a graph's external weights read-only and shared; its CPU plugin keeps that mapping for the compiled
model's lifetime beside its own packed copy, so the weights count twice in the process's memory (the SD 1.5 UNet:
5.6 GB compiled from float32 files, 2.3 GB once the mapped pages are handed back); a compiled model imported from
OpenVINO's model cache keeps its blob mapped the same way. madvise(MADV_DONTNEED) on a shared read-only file mapping
only drops the pages: a later read faults them in again from the unchanged file."""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

MADV_DONTNEED = 4


def shared_read_only(prefix: Path, maps: str) -> list[tuple[int, int]]:
    """(start, end) of each r--s mapping in /proc/self/maps text whose file path begins with prefix."""
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1] == "r--s" and fields[5].startswith(str(prefix)):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end))
    return found


def drop_mapped_pages(*prefixes: Path) -> int:
    """Drop this process's resident pages of the files at or under each prefix (a graph's model.onnx, model.onnx_data,
    ...; a model cache folder's blobs); bytes of mappings advised. Linux only; elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for prefix in prefixes:
        for start, end in shared_read_only(prefix.resolve(), maps):
            if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                advised += end - start
    return advised


class DroppingPages:
    """While open, drop the resident pages of the files at or under the prefixes every `every` seconds (a thread): a
    compiler that reads a graph's mapped weights once, packing its own copy, then holds only what it is working on
    instead of the whole file beside the copy."""

    def __init__(self, *prefixes: Path, every: float = 0.25) -> None:
        self.prefixes, self.every = prefixes, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            drop_mapped_pages(*self.prefixes)

    def __enter__(self) -> DroppingPages:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        drop_mapped_pages(*self.prefixes)
