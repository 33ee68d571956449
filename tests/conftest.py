"""Shared fixtures: seeded presets, and helpers that run a forward both ways."""
from __future__ import annotations

import os
import signal

import pytest
import torch

import emulate
from emulate.runtime.verify import row_errors
from emulate.models.presets import preset
from emulate.models.reference import reference_forward

torch.set_num_threads(2)


def emulate_and_reference(config, weights, tokens, block_size, patterns, dtype, seed=0):
    """(emulated outputs, reference outputs, graph) for one forward on the local executor, through the API."""
    model = emulate.Model(config, weights)
    run = emulate.run(model, tokens, block_size=block_size, attention=list(patterns), dtype=dtype, seed=seed)
    with torch.no_grad():
        ref = reference_forward(model.transformer(dtype), tokens, patterns)
    got = {"hidden": run.hidden}
    if run.logprobs is not None:
        got["logprob_next"] = run.logprobs
    return got, ref, run.graph


# the worst max_rel_err per (model, pattern, compared with, dtype), printed after the run: the error table of docs/numerics.md
MEASURED: dict[tuple[str, str, str, str], float] = {}


def record_error(model: str, patterns, against: str, dtype: torch.dtype, rel: float) -> None:
    """Keep the worst error a test measured; `patterns` is one Pattern or a list (one per layer)."""
    kinds = sorted({p.kind for p in (patterns if isinstance(patterns, (list, tuple)) else [patterns])})
    key = (model, " + ".join(kinds), against, str(dtype).removeprefix("torch."))
    MEASURED[key] = max(MEASURED.get(key, 0.0), rel)


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("max_rel_err measured by these tests (worst case over sizes and variants)")
    terminalreporter.write_line("| model | attention | compared with | float32 | float64 |")
    terminalreporter.write_line("| --- | --- | --- | --- | --- |")
    cell = lambda err: "" if err is None else f"{err:.1e}" if err else "0"  # noqa: E731
    for row in sorted({k[:3] for k in MEASURED}):
        cells = [cell(MEASURED.get((*row, d))) for d in ("float32", "float64")]
        terminalreporter.write_line(f"| {' | '.join(row)} | {' | '.join(cells)} |")


@pytest.fixture(scope="session")
def presets():
    return {name: preset(name) for name in ("tiny-llama", "tiny-mistral", "tiny-bert")}


class Watched:
    """An executor that keeps the Execution it started, so a test can act on it mid-run.

    Wraps another executor (emulate.Ray(...)) for `emulate.stream`; `execution.figures` holds the
    Ray workers' names and pids from the first block on (a fault test kills one of them).
    """

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.execution = None

    def start(self, job, progress=None):
        self.execution = self.inner.start(job, progress)
        return self.execution


class CrashOnce:
    """An oracle that SIGKILLs the process it runs in at the first pair call of one layer's query
    block (queries from `start`), once in the whole run: the first process there creates `marker`
    and writes its pid into it, the others (the restarted worker, a re-run) find it and go on. Every
    call runs the kernel oracle, so the outputs are the kernel's bits.

    A fault test chooses where in a worker's own work it dies, rather than killing it when the
    driver happens to see some count of finished tasks: on a busy machine the driver sees late, and
    the worker may have finished all it had by then (nothing to restart, nothing to recover).
    """

    name = "crash-once"
    distributed = True  # pickles to the Ray workers; its summary is empty

    def __init__(self, marker, layer: int, start: int):
        self.marker, self.layer, self.start = str(marker), layer, start
        self.driver = os.getpid()  # the test's own process: never killed (a local executor would run it here)

    def bind(self, block_size, heads):
        return _CrashingOnce(self, emulate.KernelOracle().bind(block_size, heads))


class _CrashingOnce:
    def __init__(self, spec: CrashOnce, kernel):
        self.spec, self.kernel = spec, kernel

    def attend(self, pair, q, k, v, scale):
        if pair.layer == self.spec.layer and pair.span[0] == self.spec.start:
            if os.getpid() == self.spec.driver:
                raise RuntimeError("CrashOnce kills Ray workers only, not the test's own process")
            try:
                fd = os.open(self.spec.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.kernel.attend(pair, q, k, v, scale)

    def summary(self):
        return {}


def crash_mid_work(p: emulate.Problem, marker, worker: int, placement: str = "sequence", workers: int = 2,
                   grid: str | None = None) -> CrashOnce:
    """A CrashOnce that kills `worker` of the Ray executor's plan for `p` (made and placed as the
    executor does, cluster/executor.py) at the middle one of its layer tasks: by then it has run
    some, holds their keys and values, and has some left."""
    from cluster.placement import Placement, layout_of
    from graphs.plan import make_plan

    layout = layout_of(Placement(placement), workers, p.model.config.layers, grid)
    plan = make_plan(p.compact_graph(), layout.plan_workers)
    layout.place(plan)
    own = [t for t in plan.tasks if t.worker == worker and t.layer >= 0]
    t = own[len(own) // 2]
    return CrashOnce(marker, t.layer, t.block * p.block_size)


__all__ = ["CrashOnce", "Watched", "crash_mid_work", "emulate_and_reference", "record_error", "row_errors"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole run (tests/test_ray.py, tests/test_placement.py): 4 CPUs,
    no GPU, no dashboard; stopped at the end."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             namespace="emulate")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
