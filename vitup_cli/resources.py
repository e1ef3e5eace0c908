"""What a block of work cost: wall seconds and peak memory (host resident set, and CUDA when used).

``with PeakMemory() as peak: ...`` samples the process's resident set size every ``interval`` seconds on a
thread (``ru_maxrss`` only ever grows, so it cannot tell one block's peak from an earlier one's) and reads
``torch.cuda.max_memory_allocated`` after resetting it on entry, when CUDA is initialised. Linux reads
``/proc/self/statm``; elsewhere the sampler falls back to ``ru_maxrss`` (an upper bound: the process's peak).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch


def resident_bytes() -> int:
    """The process's resident set size now, in bytes (the lifetime peak where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # POSIX only; Linux never gets here

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


class PeakMemory:
    """Peak host memory (and CUDA memory) while the block runs, and its wall time.

    Attributes (after the block): ``seconds``; ``peak_rss`` (bytes, the largest resident size seen);
    ``base_rss`` (before the block); ``cuda_peak`` (bytes allocated at most on the current CUDA device during
    the block, None without CUDA).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.base_rss = self.peak_rss = 0
        self.cuda_peak: int | None = None

    def __enter__(self) -> PeakMemory:
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.base_rss = self.peak_rss = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitup-peak-memory", daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, resident_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        self.peak_rss = max(self.peak_rss, resident_bytes())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_peak = int(torch.cuda.max_memory_allocated())

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "peak_rss": self.peak_rss, "cuda_peak": self.cuda_peak}
