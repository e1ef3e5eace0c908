"""``PeakMemory`` sees the peak of a block, not the process's lifetime peak."""

from __future__ import annotations

import mmap
import time

from vitup_cli.resources import PeakMemory, resident_bytes

BLOCK = 200 * 2**20


def _touch_block() -> None:
    """200 MiB of fresh pages, touched, then returned (an anonymous map: malloc's free lists cannot serve it)."""
    block = mmap.mmap(-1, BLOCK)
    for offset in range(0, BLOCK, mmap.PAGESIZE):
        block[offset] = 1
    time.sleep(0.05)
    block.close()


def test_peak_memory_sees_a_block_that_is_freed_before_it_ends():
    with PeakMemory(interval=0.001) as peak:
        _touch_block()
    assert peak.peak_rss - peak.base_rss > 150 * 2**20
    assert peak.seconds >= 0.05
    assert peak.cuda_peak is None or peak.cuda_peak >= 0
    with PeakMemory(interval=0.001) as small:
        time.sleep(0.02)
    assert small.peak_rss - small.base_rss < 50 * 2**20  # the earlier block is not this one's peak
    assert resident_bytes() > 0 and set(small.to_json()) == {"seconds", "peak_rss", "cuda_peak"}
