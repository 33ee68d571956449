"""How many threads a local run uses: what the caller says, or what the machine gives.

A forward here is thousands of small calls. Run one after another with torch's intra-op threads,
every call ends at a barrier of those threads, and a thread whose core another process has taken
keeps every other thread of the call waiting for it: on a 2-core machine with one other busy
process, two threads made a 16K-token causal run slower than one thread did. So the local executor
on CPU runs independent calls side by side instead (emulate/runtime/local.py, run_parallel): `threads`
is its number of call workers, each running one call at a time on one torch thread, and a worker
whose core is taken delays only its own call (docs/benchmarks.md, "On a shared machine: threads").
`worker_count`: a number as given; None (the default) torch's own setting (OMP_NUM_THREADS or the
cores); "auto" every core this process may use, never more than torch's setting. "auto" does not
drop workers when another process is busy: with no barrier between workers, a busy neighbour takes
its share of a core and no more, and the run keeps the rest. The workers' count never changes a
bit of the outputs: each call runs on one thread whatever the count.

Where calls run in turn (the paper oracle, a GPU) and in the transformers backend, `ThreadPolicy`
sets torch's intra-op threads instead: "auto" counts the cores nobody else is running on, at the
start and again every `RECHECK_S` while the run lasts, and uses that many threads (at least one,
and never more than torch was set to use: an explicit OMP_NUM_THREADS is a ceiling); a number
fixes the count for the whole run; None (the default) leaves torch's setting as it is. There a
run's bits depend on its thread count (torch's reductions split by thread), so "auto" trades
run-to-run equality of bits on a changing machine for speed.
"""
from __future__ import annotations

import os
import time

import torch

from emulate.errors import EmulateError

RECHECK_S = 0.5  # how often "auto" looks at the machine again
SAMPLES = 5  # /proc/stat snapshots per look, 2 ms apart: the count of running threads jumps about


def cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def running_elsewhere() -> float | None:
    """Threads of other processes running right now (median of a few /proc/stat snapshots, less this
    process's own running threads), or None where the system does not say (not Linux)."""
    seen = []
    for k in range(SAMPLES):
        try:
            with open("/proc/stat", encoding="ascii") as f:
                running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        except (OSError, StopIteration, ValueError):
            return None
        seen.append(max(0, running - own_running()))
        if k + 1 < SAMPLES:
            time.sleep(0.002)
    return sorted(seen)[len(seen) // 2]


def own_running() -> int:
    """This process's threads in state R (running or runnable), the reading thread among them:
    torch's pool threads spin between calls, and they are ours, not contention."""
    count = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        count += state == "R"
    return max(1, count)


def free_cores() -> int:
    """Cores not taken by other processes now; at least 1."""
    n = cores()
    others = running_elsewhere()
    return n if others is None else max(1, min(n, n - int(others)))


def check_threads(threads) -> int | str | None:
    """threads: None (torch's own setting, untouched), "auto" or an integer >= 1."""
    if threads is None or threads == "auto":
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EmulateError(f"--threads must be an integer >= 1 or auto, got {threads!r}")
    if threads > 4096:
        raise EmulateError(f"--threads {threads} is more than any machine here has (this process may use {cores()} cores)")
    return threads


def worker_count(threads) -> int:
    """The local executor's call workers on CPU: a number as given; None torch's own setting (OMP_NUM_THREADS
    or the cores); "auto" every core this process may use, never more than torch's setting."""
    threads = check_threads(threads)
    if threads is None:
        return torch.get_num_threads()
    return max(1, min(cores(), torch.get_num_threads())) if threads == "auto" else threads


class ThreadPolicy:
    """Sets torch's intra-op threads for the length of a run and puts the caller's count back after.

        with ThreadPolicy("auto") as policy:
            for node in order:
                policy.tick()          # "auto": look at the machine again every RECHECK_S
                ...
        policy.used                   # the counts the run went through, in order
    """

    def __init__(self, threads=None):
        self.threads = check_threads(threads)
        self.used: list[int] = []
        self._saved = None
        self._next = 0.0

    def __enter__(self) -> ThreadPolicy:
        self._saved = torch.get_num_threads()  # OMP_NUM_THREADS or torch's default: auto never goes above it
        self._set(self._auto() if self.threads == "auto" else self._saved if self.threads is None else self.threads)
        self._next = time.monotonic() + RECHECK_S
        return self

    def tick(self) -> None:
        if self.threads != "auto":
            return
        now = time.monotonic()
        if now >= self._next:
            self._set(self._auto())
            self._next = now + RECHECK_S

    def _auto(self) -> int:
        return min(free_cores(), self._saved)

    def _set(self, n: int) -> None:
        if not self.used or self.used[-1] != n:
            torch.set_num_threads(n)
            self.used.append(n)

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)
