"""The process's own peak resident memory: the CLI's peak_rss_mb, and what the memory test checks."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Linux's VmHWM belongs to the address space, which exec replaces, so it counts this program
    alone. getrusage's ru_maxrss is the fallback elsewhere; on Linux it would also carry over the
    high-water mark of the process that spawned us (a test runner, a job agent) across exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
