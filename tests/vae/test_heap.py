"""vae.fast.retained_heap: freed memory kept in the process while the block runs, glibc's defaults after.

Each scenario runs in a fresh interpreter: a clean heap, so what the block leaves behind is its own."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

_HEAP = """
import ctypes, os, threading
import torch
from vae.fast import retained_heap

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
MiB = 1 << 20

def step():  # a training-like step: eight 16 MiB activations written, alive at once, then freed
    blocks = [torch.ones(4 << 20) for _ in range(8)]
    del blocks

def mmapped(mib):  # MiB glibc serves with mmap while a tensor of `mib` MiB lives (unmapped at its free);
    block = torch.empty(mib * MiB // 4)  # each phase asks for more than any block freed before it, so
    return libc.mallinfo2().hblkhd // MiB  # no free chunk left in the heap can serve it

def rss():  # resident MiB of this process
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // MiB
"""


def _scenario(body: str) -> dict[str, int]:
    """Run ``body`` after the helpers above in a fresh interpreter; it prints ``name value`` lines."""
    proc = subprocess.run([sys.executable, "-c", _HEAP + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {name: int(value) for name, value in (line.split() for line in proc.stdout.splitlines())}


@glibc_only
def test_retained_heap_keeps_freed_memory_in_the_process_until_the_block_ends():
    seen = _scenario("""
        with retained_heap():
            step()
            print("inside_mmapped", mmapped(256))
            print("inside_rss", rss())
        print("after_rss", rss())
        print("after_mmapped", mmapped(512))
        with retained_heap(enabled=False):
            print("disabled_mmapped", mmapped(768))
    """)
    assert seen["inside_mmapped"] < 16  # large blocks come from the heap, which keeps them when freed
    assert seen["inside_rss"] - seen["after_rss"] >= 100  # at the end the kept 128 MiB go back to the OS
    assert seen["after_mmapped"] >= 512  # glibc's defaults again: large blocks mmap'd, unmapped at free
    assert seen["disabled_mmapped"] >= 768  # off: the defaults stay


@glibc_only
def test_retained_heap_is_restored_by_the_last_of_overlapping_users():
    """Two trainers in two threads: the one that leaves first must not restore the heap under the other."""
    seen = _scenario("""
        entered, release = threading.Event(), threading.Event()
        def other_trainer():
            with retained_heap():
                entered.set()
                release.wait(timeout=60)
        thread = threading.Thread(target=other_trainer)
        thread.start()
        entered.wait(timeout=60)
        with retained_heap():
            pass  # starts after the other, ends first
        print("one_left", mmapped(256))
        release.set()
        thread.join()
        print("both_left", mmapped(512))
    """)
    assert seen["one_left"] < 16
    assert seen["both_left"] >= 512


@glibc_only
def test_retained_heap_restores_the_heap_when_the_block_raises():
    seen = _scenario("""
        try:
            with retained_heap():
                raise RuntimeError("boom")
        except RuntimeError:
            print("after", mmapped(256))
    """)
    assert seen["after"] >= 256
