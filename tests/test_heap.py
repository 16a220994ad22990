"""HeapTrimmer: the heap is trimmed once private memory has grown by its slack, and only then."""

from __future__ import annotations

import pytest
import torch

from lora_analysis.analysis import heap


class FakeProcess:
    """Private memory that the test moves, and a malloc_trim that gives back what is free."""

    def __init__(self):
        self.private, self.free, self.trims = 100, 0, 0

    def allocate_and_free(self, size: int) -> None:  # freed, but kept by the allocator
        self.private += size
        self.free += size

    def trim(self, pad: int) -> int:
        self.trims += 1
        self.private -= self.free
        self.free = 0
        return 1


@pytest.fixture
def process(monkeypatch):
    fake = FakeProcess()
    monkeypatch.setattr(heap, "MALLOC_TRIM", fake.trim)
    monkeypatch.setattr(heap, "private_resident_bytes", lambda: fake.private)
    return fake


def test_trims_once_growth_exceeds_the_slack_and_bounds_the_kept_memory(process):
    trim = heap.HeapTrimmer(slack=10)
    peak = 0
    for _ in range(100):
        process.allocate_and_free(3)
        trim()
        peak = max(peak, process.private)
    assert peak <= 100 + 10 + 3  # start + slack + one step
    assert process.trims == 300 // 12  # one trim per 12 bytes of growth (the first step above the slack)


def test_live_growth_moves_the_level_instead_of_trimming_every_time(process):
    trim = heap.HeapTrimmer(slack=10)
    process.private += 50  # kept results, not free memory: a trim gives nothing back
    trim()
    assert process.trims == 1 and trim.level == 150
    process.private += 5
    trim()
    assert process.trims == 1  # below the slack above the new level


def test_does_nothing_without_glibc(monkeypatch, process):
    monkeypatch.setattr(heap, "MALLOC_TRIM", None)
    trim = heap.HeapTrimmer(slack=0)
    process.allocate_and_free(100)
    trim()
    assert process.trims == 0


@pytest.mark.skipif(heap.MALLOC_TRIM is None or heap.private_resident_bytes() is None, reason="needs glibc and /proc")
def test_real_trim_gives_freed_heap_memory_back():
    """Blocks below the (raised) mmap threshold, freed under a small live one, come back."""
    torch.empty(8 * 2**20, dtype=torch.uint8)  # freed at once: raises glibc's mmap threshold past 4 MB
    before = heap.private_resident_bytes()
    blocks = [torch.ones(4 * 2**20, dtype=torch.uint8) for _ in range(16)]
    pin = torch.ones(16)  # a small live result above them on the heap
    del blocks
    trim = heap.HeapTrimmer(slack=2**20)
    trim.level = before
    trim()
    assert heap.private_resident_bytes() - before < 32 * 2**20
    del pin
