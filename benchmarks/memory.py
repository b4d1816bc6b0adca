"""The most memory a benchmark's process has held resident, for the benchmarks that report it."""

from __future__ import annotations

import sys

try:
    import resource
except ImportError:  # Windows
    resource = None


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes (0 where ``resource`` is missing)."""
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024
