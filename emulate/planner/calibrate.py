"""This machine's CPU as the planner's cost model sees it (emulate/planner/costs.py, Device):
matmul and attention FLOP/s by call size, the per-call cost of the local executor, memory bandwidth
and how much one-thread workers slow each other, measured once per torch thread count and cached
as JSON (`cache_path`, under $XDG_CACHE_HOME)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from emulate.models.config import ModelConfig
from emulate.planner.costs import Device

def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emulate" / "cpu-calibration.json"


def cpu_device(recalibrate: bool = False) -> Device:
    """This machine's CPU, measured once at torch's thread count and cached (cache_path()).

    A cache that is not what this module writes (cut short, edited, another program's JSON) is
    measured again, with one note on stderr, and rewritten: a cache is never a reason to fail."""
    import torch

    threads = torch.get_num_threads()
    path = cache_path()
    data: dict = {}
    corrupt = False
    if path.exists() and not recalibrate:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError):
            data = {}
        except (ValueError, RecursionError):
            data, corrupt = {}, True
        if not isinstance(data, dict):
            data, corrupt = {}, True
    entry = data.get(str(threads))
    if entry is not None:
        try:
            return _device(entry, threads)
        except _CacheError:
            if isinstance(entry, dict) and "contention" not in entry and _device_fields_ok(entry):
                entry = {**entry, "contention": _contention()}  # cached before contention was measured
            else:
                entry, corrupt = None, True
    if corrupt:
        print(f"emulate: note: the CPU calibration cache {path} is not valid; measuring this machine again",
              file=sys.stderr)
    if entry is None:
        entry = calibrate_cpu()
    data[str(threads)] = entry
    try:
        from graphs.files import write_file

        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(data, indent=1))
    except (OSError, ValueError):
        pass  # an unwritable cache costs a re-measurement next time, nothing else
    return _device(entry, threads)


class _CacheError(ValueError):
    """A cached entry that is not what calibrate_cpu writes."""


def _rates(value, low: float = 0.0) -> list:
    ok = isinstance(value, list) and value and all(
        isinstance(r, list) and len(r) == 2 and all(_number(x, low) for x in r) for r in value)
    if not ok:
        raise _CacheError("a list of [size, rate] pairs expected")
    return value


def _number(x, low: float = 0.0) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > low


def _device_fields_ok(entry: dict) -> bool:
    try:
        _check_entry({**entry, "contention": [1.0]})
    except _CacheError:
        return False
    return True


def _check_entry(entry) -> None:
    if not isinstance(entry, dict):
        raise _CacheError("not an object")
    _rates(entry.get("matmul_flops")), _rates(entry.get("attention_flops"))
    for key in ("bandwidth", "memory"):
        if not _number(entry.get(key)):
            raise _CacheError(key)
    overhead = entry.get("call_overhead_s")
    if not (_number(overhead, -1.0) and overhead >= 0) or not isinstance(entry.get("when"), str):
        raise _CacheError("call_overhead_s or when")
    for key in ("mask_factor", "contention"):
        value = entry.get(key)
        if not (isinstance(value, list) and value and all(_number(x) for x in value)):
            raise _CacheError(key)


def _device(entry, threads: int) -> Device:
    _check_entry(entry)
    return Device("cpu", {"fp32": entry["matmul_flops"][-1][1], "bf16": entry["matmul_flops"][-1][1]},
                  entry["bandwidth"], entry["memory"], 1.0, entry["call_overhead_s"],
                  f"measured on this machine ({threads} thread(s), {entry['when']})",
                  attention_flops={f: r for f, r in entry["attention_flops"]},
                  matmul_flops={f: r for f, r in entry["matmul_flops"]}, mask_factor=tuple(entry["mask_factor"]),
                  contention=tuple(entry["contention"]))


def calibrate_cpu(budget_s: float = 8.0) -> dict:
    """Measure matmul and attention FLOP/s at block-call sizes, the per-call cost of a small
    attention call, and memory bandwidth; a few seconds in all."""
    import psutil
    import torch

    from emulate.runtime.contract import PairCall
    from emulate.runtime.kernels import attend
    from emulate.runtime.oracles import KernelOracle
    from graphs import MaskKind, Pattern
    from graphs.patterns import kernel_entries

    per = budget_s / 12

    def timed(fn) -> float:
        fn()
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            spent = time.perf_counter() - t0
            if spent >= per or reps >= 200:
                return spent / reps

    g = torch.Generator().manual_seed(0)
    matmul = []
    for m, k, n in ((64, 256, 256), (256, 256, 512), (512, 1024, 1024), (1024, 2048, 2048)):
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        matmul.append((2 * m * k * n, 2 * m * k * n / timed(lambda: a @ b)))
    attention = []
    for h, m, dh in ((8, 64, 32), (8, 256, 32), (8, 1024, 32), (16, 2048, 64)):
        q, k, v = (torch.randn(h, m, dh, generator=g) for _ in range(3))
        attention.append((4 * h * dh * m * m, 4 * h * dh * m * m / timed(lambda: attend(q, k, v, 0.1, MaskKind.NONE))))
    q, k, v = torch.randn(8, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g)
    window, pair = Pattern("sliding", window=512), ((512, 1024), (0, 512))
    plain = timed(lambda: attend(q, k, v, 0.1, MaskKind.NONE))
    # an explicit pair runs in tiles (emulate/runtime/kernels.py, attend_intervals); its factor is per score computed
    tiled = timed(lambda: KernelOracle().attend(PairCall(0, *pair, MaskKind.EXPLICIT, window), q, k, v, 0.1))
    computed = kernel_entries(window, MaskKind.EXPLICIT, *pair)
    factors = [1.0, timed(lambda: attend(q, k, v, 0.1, MaskKind.CAUSAL)) / plain, tiled / plain * 512 * 512 / computed,
               1.0]
    big = torch.empty(2**25)  # 128 MiB
    copy = timed(lambda: big.clone())
    return {"matmul_flops": matmul, "attention_flops": attention, "mask_factor": factors,
            "call_overhead_s": _call_overhead(matmul, attention), "contention": _contention(budget_s / 4),
            "bandwidth": 2 * big.numel() * 4 / copy, "memory": float(psutil.virtual_memory().total),
            "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M")}


def _contention(budget_s: float = 2.0) -> list[float]:
    """[1.0, f_2, ..., f_C]: how much longer a block-sized matmul loop takes on each of k threads
    running it at once than on one thread alone, for k up to the cores this process may use (at
    most 8). Threads of one process, each on one torch thread (torch releases the GIL inside the
    kernel), share the cores as one-thread worker processes do: the factor holds what the machine
    gives k workers at once (shared caches and memory bandwidth, and any other work running then)."""
    import threading

    import torch

    from emulate.runtime.threads import cores as usable_cores

    cores = min(8, usable_cores())
    if cores < 2:
        return [1.0]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.05:
            a @ b
            reps += 1
        reps = max(3, int(reps * budget_s / 0.05 / sum(range(1, cores + 1))))  # the budget over k = 1 .. C

        def loop(out: list):
            torch.set_num_threads(1)  # OpenMP's count is per thread: each loop is one worker of one thread
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            out.append(time.perf_counter() - start)

        per_k = []
        for k in range(1, cores + 1):
            times: list[float] = []
            threads = [threading.Thread(target=loop, args=(times,)) for _ in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            per_k.append(sum(times) / k)
    finally:
        torch.set_num_threads(before)
    return [1.0] + [max(1.0, t / per_k[0]) for t in per_k[1:]]


def _call_overhead(matmul, attention) -> float:
    """Seconds per logical call beyond its FLOPs: a forward of a model so narrow that the calls
    are all overhead (node dispatch, mask building, merges), run by the local executor."""
    import torch

    from emulate.api import run
    from emulate.models.loaders import Model
    from emulate.models.presets import weight_names

    config = ModelConfig(name="probe", family="llama", vocab=64, width=16, layers=2, heads=2, kv_heads=1,
                         head_dim=8, mlp_width=32)
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5
               for name, shape in weight_names(config).items()}
    model = Model(config, weights)
    # one call worker: the local executor's per-call cost, as the planner's one local worker pays it
    run(model, random_tokens=64, block_size=8, attention="causal", collect=False, threads=1)  # warm-up
    probe = run(model, random_tokens=256, block_size=8, attention="causal", collect=False, threads=1)
    return probe.stats["forward_s"] / probe.stats["graph_nodes"]
