"""This machine's CPU as the planner's cost model sees it (emulate/planner/costs.py, Device):
matmul and attention FLOP/s by call size (the attention kernels the executor runs, per mask: none,
causal, and the tiled explicit calls of windows and sinks), the per-call cost of the local executor,
memory bandwidth (a copy's, and one token's linear reading cold weights) and how much one-thread
workers slow each other, measured once and cached as JSON (`cache_path`, under $XDG_CACHE_HOME)
with when, under what load and under which settings it was taken (`Calibration`,
emulate/planner/costs.py).

Every call the executors run on a CPU runs on one torch thread: the local executor's call workers
(emulate/runtime/local.py, run_parallel; one worker runs in the calling thread at one thread) and
each Ray worker of one CPU. So the rates are measured on one thread, and what k workers at once
cost each other is the contention curve. Each size is measured in ROUNDS short rounds and the
fastest kept: on a shared machine a round that another process interrupted is slower, never
faster, so the minimum is the machine's own rate. `calibration_warnings` says when the cache is
not to be trusted: taken on a busy machine, older than a week, or under another torch or core count.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from emulate.models.config import ModelConfig
from emulate.planner.costs import Calibration, Device

CACHE_FORMAT = 8  # caches of another format (older releases) are measured again
ROUNDS = 5  # short rounds per size; the fastest is kept
BUSY_MARGIN = 0.5  # busy: the 1-minute load average when calibration began above cores - this
STALE_S = 7 * 86400  # a calibration older than a week is flagged
# Ray starts its worker processes at this niceness unless RAY_worker_niceness says otherwise
# (ray-project/ray, src/ray/common/ray_config_def.h, `RAY_CONFIG(int, worker_niceness, 15)`: "so
# that the OS prioritizes CPU for other processes over worker"); `_worker_contention` measures
# workers at it
RAY_WORKER_NICENESS = 15


# The forwards the calibration runs (the probe model of `_call_overhead`: model, N, M, attention),
# beside its synthetic kernel calls: none is a validation row (benchmarks/plan_validation.py;
# tests/test_planner_validation.py checks it)
PROBE = "probe"
PROBE_FORWARDS = ((PROBE, 64, 8, "causal"), (PROBE, 256, 8, "causal"))


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emulate" / "cpu-calibration.json"


def current_settings() -> dict:
    """What a calibration depends on besides the machine: torch's version, the cores this process
    may use, and torch's own thread setting (OMP_NUM_THREADS or the cores)."""
    import torch

    from emulate.runtime.threads import cores

    return {"torch": torch.__version__, "cores": cores(), "torch_threads": torch.get_num_threads()}


def cpu_device(recalibrate: bool = False, *, clock=time.time, loadavg=os.getloadavg, note=None) -> Device:
    """This machine's CPU, measured once and cached (cache_path()); measured again on request, when
    the cache is missing, unreadable or of an older format (with a note on stderr)."""
    note = note or (lambda text: print(f"emulate: {text}", file=sys.stderr))
    path = cache_path()
    entry = None
    if path.exists() and not recalibrate:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                note(f"the CPU calibration at {path} is of an older format: measuring again (about 30 s)")
            else:
                entry = data
                _device(entry)  # a cache missing a field is as unreadable as a corrupt one
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
            note(f"the CPU calibration at {path} is unreadable: measuring again (about 30 s)")
            entry = None
    if entry is None:
        entry = {"format": CACHE_FORMAT, **calibrate_cpu(clock=clock, loadavg=loadavg)}
        try:
            from graphs.files import write_file

            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, json.dumps(entry, indent=1))
        except (OSError, ValueError):
            pass  # an unwritable cache costs a re-measurement next time, nothing else
    return _device(entry)


def _device(entry: dict) -> Device:
    cal = Calibration(**entry["calibration"])
    tables = {mask: {float(f): float(r) for f, r in rows} for mask, rows in entry["attention_flops"].items()}
    matmul = {float(f): float(r) for f, r in entry["matmul_flops"]}
    peak = max(matmul.values())
    return Device("cpu", {"fp32": peak, "bf16": peak}, float(entry["bandwidth"]), float(entry["memory"]), 1.0,
                  float(entry["call_overhead_s"]), f"measured on this machine ({cal.describe()})",
                  attention_flops=tables["none"], matmul_flops=matmul,
                  masked_attention={m: t for m, t in tables.items() if m != "none"},
                  contention=tuple(float(c) for c in entry["contention"]),
                  worker_contention=tuple(float(c) for c in entry["worker_contention"]), calibration=cal,
                  serial_call_s=tuple(float(c) for c in entry["serial_call_s"]),
                  loaded_call_s=tuple(float(c) for c in entry["loaded_call_s"]),
                  merge_flops={float(f): float(r) for f, r in entry["merge_flops"]},
                  node_flops=_by_tokens(entry["node_flops"]),
                  read_rates={float(n): float(r) for n, r in entry["read_rates"]},
                  probe_miss=float(entry["kernel_probe_miss"]))


def _by_tokens(rows) -> dict:
    """[(M, FLOPs, FLOP/s)] -> {M: {FLOPs: FLOP/s}}."""
    table: dict = {}
    for m, flops, rate in rows:
        table.setdefault(int(m), {})[float(flops)] = float(rate)
    return table


def calibration_warnings(cal: Calibration, *, now: float, settings: dict) -> list[str]:
    """Why a cached calibration may mislead: taken while the machine was busy, older than a week,
    or under other settings than `settings` (current_settings())."""
    out = []
    if cal.load > cal.cores - BUSY_MARGIN or cal.others_cores >= BUSY_MARGIN:
        out.append(f"the CPU calibration was measured while the machine was busy (load average {cal.load:.2f} on "
                   f"{cal.cores} cores, other processes using {cal.others_cores:.1f}): predictions carry that load; "
                   "`emulate plan --recalibrate` on a quiet machine")
    age = now - cal.when
    if age > STALE_S:
        out.append(f"the CPU calibration is {age / 86400:.0f} days old; `emulate plan --recalibrate` measures again")
    then = {"torch": cal.torch, "cores": cal.cores}
    if then != {k: settings[k] for k in then}:
        shown = lambda s: f"torch {s['torch']}, {s['cores']} cores"
        out.append(f"the CPU calibration was made under other settings ({shown(then)}; now {shown(settings)}); "
                   "`emulate plan --recalibrate` measures again")
    return out


def ray_worker_niceness() -> int:
    """The niceness Ray starts its workers at here: RAY_worker_niceness when set (Ray takes 0 to 19),
    else RAY_WORKER_NICENESS; a value Ray would not take is one line."""
    from emulate.errors import EmulateError

    text = os.environ.get("RAY_worker_niceness")
    if text is None:
        return RAY_WORKER_NICENESS
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise EmulateError(f"RAY_worker_niceness must be an integer from 0 to 19, as Ray takes it, got {text!r}")
    return value


def _others_cores(seconds: float = 1.0) -> float:
    """Cores' worth of CPU the other processes on this machine used over `seconds` while this one
    sleeps: the machine's busy time (user, nice, system, interrupts, and time a hypervisor gave
    elsewhere) less this process's own, over the wall time."""
    import psutil

    def busy(t) -> float:
        return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))

    me = psutil.Process()
    t0, machine, own = time.perf_counter(), busy(psutil.cpu_times()), sum(me.cpu_times()[:2])
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    return max(0.0, (busy(psutil.cpu_times()) - machine - (sum(me.cpu_times()[:2]) - own)) / wall)


def _fastest(fn, per: float) -> float:
    """Seconds per call of fn: ROUNDS rounds of about `per` / ROUNDS seconds each, the fastest kept."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, min(200, int(per / ROUNDS / once)))
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def calibrate_cpu(budget_s: float = 10.0, *, clock=time.time, loadavg=os.getloadavg) -> dict:
    """Measure, on one torch thread: matmul FLOP/s at block-call sizes; attention FLOP/s of the
    executor's own kernels by mask (emulate/runtime/kernels.py: unmasked and causal block calls,
    and a window's explicit pairs through the kernel oracle, which cuts them into tiles) per score
    the kernel computes (graphs.patterns.kernel_entries); the local executor's per-call cost;
    memory bandwidth, of a copy and of a token's linear reading cold weights; the contention of k
    one-thread workers, as threads and as processes at Ray's worker niceness; what other processes
    use of the cores; and the call workers' per-call cost beside kernels (a probe forward). About
    budget_s + 20 seconds."""
    import psutil
    import torch

    from emulate.runtime.contract import PairCall
    from emulate.runtime.kernels import attend
    from emulate.runtime.oracles import KernelOracle
    from graphs import MaskKind, Pattern
    from graphs.patterns import kernel_entries, pair_mask

    settings = current_settings()
    nice = ray_worker_niceness()  # before anything is measured: a bad value costs no time
    load = float(loadavg()[0])
    began = clock()
    others = _others_cores()
    per = budget_s / 20
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        matmul = []
        for m, k, n in ((64, 256, 256), (256, 256, 512), (512, 1024, 1024), (1024, 2048, 2048)):
            a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
            matmul.append((2 * m * k * n, 2 * m * k * n / _fastest(lambda a=a, b=b: a @ b, per)))
        tables: dict[str, list] = {"none": [], "causal": [], "explicit": []}
        shapes = ((8, 64, 32), (8, 256, 32), (8, 1024, 32), (16, 2048, 64))
        for h, m, dh in shapes:
            q, k, v = (torch.randn(h, m, dh, generator=g) for _ in range(3))
            block = 4 * h * dh * m * m
            for mask in (MaskKind.NONE, MaskKind.CAUSAL):
                tables[mask.value].append((block, block / _fastest(lambda q=q, k=k, v=v, mask=mask: attend(q, k, v, 0.1, mask), per)))
        oracle = KernelOracle()
        for h, m, dh, r in ((8, 256, 32, 64), (8, 1024, 32, 256), (8, 2048, 32, 512), (16, 2048, 64, 1024)):
            # a sliding window's two explicit pairs of block 1: the diagonal band and the block before
            window = Pattern("sliding", window=r)
            q = torch.randn(h, m, dh, generator=g)
            k, v = torch.randn(h, m, dh, generator=g), torch.randn(h, m, dh, generator=g)
            for span, keys in (((m, 2 * m), (m, 2 * m)), ((m, 2 * m), (0, m))):
                mask = pair_mask(window, span, keys).kind
                if mask != MaskKind.EXPLICIT:
                    continue
                pair = PairCall(0, span, keys, mask, window)
                flops = 4 * h * dh * kernel_entries(window, mask, span, keys)
                tables["explicit"].append((flops, flops / _fastest(lambda p=pair, q=q, k=k, v=v: oracle.attend(p, q, k, v, 0.1), per)))
        tables["explicit"].sort()
        merges = _merge_rates(g, per)
        nodes = _node_rates(g, per)
        big = torch.empty(2**25)  # 128 MiB
        copy = _fastest(lambda: big.clone(), per)
        reads = _read_rates(g, per)
    finally:
        torch.set_num_threads(before)
    serial = _call_overhead()
    call = serial[0]
    contention, alone = _contention(budget_s / 4)
    workers = _worker_contention(alone, nice, budget_s / 4)
    cal = Calibration(when=began, load=load, load_after=load, cores=settings["cores"], torch=settings["torch"],
                      torch_threads=settings["torch_threads"], call_threads=1, others_cores=others)
    entry = {"matmul_flops": matmul, "attention_flops": tables, "merge_flops": merges, "node_flops": nodes,
             "call_overhead_s": call, "serial_call_s": serial, "contention": contention,
             "worker_contention": workers, "bandwidth": 2 * big.numel() * 4 / copy,
             "read_rates": reads,
             "memory": float(psutil.virtual_memory().total), "calibration": cal.to_dict()}
    # the per-call cost of call workers running kernels: fitted on the kernel probe with the rest as measured
    entry["loaded_call_s"], entry["kernel_probe_miss"] = _loaded_calls(entry)
    done = replace(cal, load_after=float(loadavg()[0]), seconds=clock() - began)
    return {**entry, "calibration": done.to_dict()}


# (rows, columns) of the random matrices `_read_rates` times, 0.25 to 32 MiB of float32, each in a
# ring of READ_RING_BYTES so that none is in a cache when read again (the decode rows that validate
# the rate run models, benchmarks/plan_decode_validation.py; the calibration runs none of them)
READ_SHAPES = ((256, 256), (512, 1024), (1024, 2048), (2048, 4096))
READ_RING_BYTES = 2**27  # 128 MiB, past the last-level cache of the machines this runs on


def _read_rates(g, per: float) -> list:
    """[(bytes of one matrix, bytes/s)]: one token's linear (F.linear of a [1, in] row, as a decode
    step's projections and MLP run it, emulate/models/block.py) over a ring of distinct weight
    matrices, each read once a round: a decode step reads every weight once, cold, so a matrix
    timed alone (warm in the caches) reads several times faster than a step does."""
    import torch
    import torch.nn.functional as F

    out = []
    for rows, cols in READ_SHAPES:
        nbytes = rows * cols * 4
        ring = [torch.randn(rows, cols, generator=g) for _ in range(max(1, READ_RING_BYTES // nbytes))]
        x = torch.randn(1, cols, generator=g)
        seconds = _fastest(lambda ring=ring, x=x: [F.linear(x, w) for w in ring], per)
        out.append((nbytes, nbytes * len(ring) / seconds))
    return out


MERGE_PARTIALS = 4  # partials per timed merge: three pairwise merges of the tree


def _merge_rates(g, per: float) -> list:
    """[(FLOPs of one pairwise merge, FLOP/s)]: the executor's own merge (emulate/runtime/merge.py,
    `merge`, which the runner's merge node calls) on MERGE_PARTIALS partials of block-call shapes,
    FLOPs counted as the graph counts them (graphs/costs.py, merge_cost). The merge is elementwise:
    its passes over the partials' memory, not its arithmetic, set its time, so it runs far below the
    GEMM rate the rest of a task's non-attention FLOPs are priced at."""
    import torch

    from emulate.runtime.merge import merge

    out = []
    for h, m, dh in ((8, 64, 32), (8, 256, 32), (8, 1024, 32), (16, 2048, 64)):
        partials = [(torch.randn(h, m, dh, generator=g), torch.randn(h, m, generator=g)) for _ in range(MERGE_PARTIALS)]
        flops = 5 * m * h * dh * (MERGE_PARTIALS - 1)
        out.append((flops / (MERGE_PARTIALS - 1), flops / _fastest(lambda p=partials: merge(p), per)))
    return out


# The block shapes whose position-wise nodes `_node_rates` times: (width, heads, kv_heads, mlp_width),
# head_dim 32, at M = 256, 1024 and 2048 (the Ms of the validation rows' range; no row is any of these
# synthetic blocks, benchmarks/plan_validation.py)
NODE_SHAPES = ((128, 4, 2, 256), (512, 16, 4, 1024))
NODE_TOKENS = (256, 1024, 2048)


def _node_rates(g, per: float, shapes=NODE_SHAPES, tokens=NODE_TOKENS) -> list:
    """[(M, FLOPs of one position-wise call, FLOP/s)], for each of `shapes` at each M of `tokens`
    in that order: the executor's own project and mix nodes (emulate/models/block.py, which the
    runner calls: norms, the projections, RoPE, the MLP and the residuals) of a synthetic Llama
    block on M rows, FLOPs as graphs/costs.py counts them, keyed by M and the mean of the two calls
    (Device.node_rate reads them). Their elementwise work (norms, RoPE, SiLU, residual adds, the
    copies into heads) runs beside the GEMMs the FLOPs count, so the rate is below a bare GEMM's at
    the same size. benchmarks/calibration_coverage.py times other shapes through it."""
    import torch

    from emulate.models.block import Transformer
    from emulate.models.presets import weight_names
    from graphs import ForwardSpec, Pattern
    from graphs.costs import mix_cost, project_cost

    cases = []
    for width, heads, kv_heads, mlp in shapes:
        config = ModelConfig(name="calibration", family="llama", vocab=64, width=width, layers=1, heads=heads,
                             kv_heads=kv_heads, head_dim=32, mlp_width=mlp)
        weights = {name: torch.randn(shape, generator=g) / shape[-1] ** 0.5
                   for name, shape in weight_names(config).items()}
        block = Transformer(config, weights)
        spec = ForwardSpec(tokens=max(tokens), block_size=max(tokens), patterns=(Pattern("causal"),),
                           heads=heads, kv_heads=kv_heads, head_dim=32, width=width, mlp_width=mlp, vocab=0,
                           dtype_bytes=4)
        for m in tokens:
            x, positions = torch.randn(m, width, generator=g), torch.arange(m)
            o = torch.randn(heads, m, 32, generator=g)

            def nodes(x=x, positions=positions, o=o, block=block):
                block.project(0, x, positions)
                block.mix(0, x, o)
            cases.append((m, project_cost(spec, m)[0] + mix_cost(spec, m)[0], nodes))
    out = []
    with torch.no_grad():
        # every case once before any is timed: a run's process has made buffers of its calls' sizes
        # before most of its calls, and the allocator serves them from memory it keeps; the first
        # calls of a size each map fresh pages (a case timed before the largest measured up to 40%
        # slower than the same case timed after it)
        for _, _, nodes in sorted(cases, key=lambda c: -c[1]):
            nodes()
        for m, flops, nodes in cases:
            out.append((m, flops / 2, flops / _fastest(nodes, per)))
    return out


def _kernel_mix():
    """The executor's own kernels in turn, one call each at a block call's size (M = 512, tiny-model
    heads): the feed-forward's two GEMMs, an unmasked and a causal GQA attend
    (emulate/runtime/kernels.py) and a sliding window's explicit pair through the kernel oracle, which
    cuts it into tiles. What k call workers do to each other depends on what they run: torch's CPU
    flash kernel allocates and streams its own buffers per call, a GEMM mostly reuses its cache, so
    the contention is measured on these calls rather than on one synthetic GEMM."""
    import torch

    from emulate.runtime.contract import PairCall
    from emulate.runtime.kernels import attend
    from emulate.runtime.oracles import KernelOracle
    from graphs import MaskKind, Pattern
    from graphs.patterns import pair_mask

    g = torch.Generator().manual_seed(0)
    m, width, mlp, H, Hkv, dh = 512, 256, 512, 8, 2, 32
    x, up, down = (torch.randn(m, width, generator=g), torch.randn(width, 2 * mlp, generator=g),
                   torch.randn(mlp, width, generator=g))
    q, k, v = torch.randn(H, m, dh, generator=g), torch.randn(Hkv, m, dh, generator=g), torch.randn(Hkv, m, dh, generator=g)
    window = Pattern("sliding", window=m // 2)
    span = (m, 2 * m)
    pair = PairCall(0, span, span, pair_mask(window, span, span).kind, window)
    oracle = KernelOracle()

    def mix():
        h = x @ up
        h[:, :mlp] @ down
        attend(q, k, v, 0.1, MaskKind.NONE)
        attend(q, k, v, 0.1, MaskKind.CAUSAL)
        oracle.attend(pair, q, k, v, 0.1)
    return mix


def _mix_rate(mix, seconds: float) -> tuple[int, float]:
    """(mixes done, seconds they took): `mix` run back to back until `seconds` have passed."""
    t0 = time.perf_counter()
    done = 0
    while True:
        mix()
        done += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done, elapsed


def _factor(k: int, rounds: list[float], alone: float) -> float:
    """k workers' contention factor from their summed rates (mixes per second) in ROUNDS windows:
    k / (the median rate x one mix alone), at least 1."""
    import statistics

    return max(1.0, k / (statistics.median(rounds) * alone))


def _contention(budget_s: float = 2.0) -> tuple[list[float], float]:
    """([1.0, f_2, ..., f_C], seconds of one kernel mix on one thread alone): how much longer the
    executor's kernels (`_kernel_mix`) take on each of k threads running them at once than on one
    thread alone, for k up to the cores this process may use (at most 8). Threads of one process,
    each on one torch thread (torch releases the GIL inside the kernel), share the cores as the
    local executor's call workers do: the factor holds what the machine gives k workers at once
    (shared caches and memory bandwidth, the allocator, and any other work running then). One
    alone: the fastest of ROUNDS rounds (an interrupted round is slower, never faster). k at once:
    every thread runs mixes back to back through the same window, their rates summed, the median of
    ROUNDS windows: a steady share, as a run's workers that keep taking tasks see it (threads that
    each ran a fixed count would let the first to finish hand its core to the rest, and the fastest
    window is the one a neighbour happened to take least of)."""
    import threading

    import torch

    from emulate.runtime.threads import cores as usable_cores

    cores = min(8, usable_cores())
    window = budget_s / ROUNDS / cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mix = _kernel_mix()
        with torch.no_grad():
            mix()
            alone = min(elapsed / done for done, elapsed in (_mix_rate(mix, window) for _ in range(ROUNDS)))

        def loop(out: list):
            torch.set_num_threads(1)  # OpenMP's count is per thread: each loop is one worker of one thread
            with torch.no_grad():  # grad mode is per thread, as in the executor's workers
                done, elapsed = _mix_rate(mix, window)
            out.append(done / elapsed)

        factors = [1.0]
        for k in range(2, cores + 1):
            rounds = []
            for _ in range(ROUNDS):
                rates: list[float] = []
                threads = [threading.Thread(target=loop, args=(rates,)) for _ in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rounds.append(sum(rates))
            factors.append(_factor(k, rounds, alone))
    finally:
        torch.set_num_threads(before)
    return factors, alone


# The forward `_loaded_calls` runs (model, N, M, attention): the probe model widened so that its
# calls are mostly kernels (width 128, M = 512: about 4% of a call is Python); not a validation row
KERNEL_PROBE = (PROBE, 8192, 512, "causal")
KERNEL_PROBE_SHAPE = dict(width=128, heads=4, kv_heads=2, head_dim=32, mlp_width=256)


def _loaded_calls(entry: dict) -> tuple[list[float], float]:
    """([s_1, ..., s_C], miss): seconds of GIL-held Python per logical call with k call workers
    *while they run kernels*: the per-call cost at which the planner's simulation (emulate/planner/simulation.py)
    of KERNEL_PROBE's forward on k call workers, the rest of `entry` as measured, takes as long as
    that forward measured on this machine (the median of ROUNDS forwards per k); the simulation's
    own miss with one worker is divided out first, so only what k workers add is put on their
    calls, and never below the all-Python probe's per-call cost (entry's serial_call_s). Beside a
    busy neighbour this is where call workers lose more than the cores' fair share: a worker that
    holds the GIL is preempted and the others wait on it, so that two call workers run about as
    fast as one. A median, not the fastest: a neighbour's share is steady, and the fastest forward
    is the one it happened to take least of. `miss`: that forward on one worker measured over
    simulated, the model's own miss on a calibration problem (printed, never applied)."""
    import statistics

    from emulate.api import run
    from emulate.planner.costs import CPU_LINK_GBPS, CPU_LINK_LATENCY_S, Hardware, cpu_sharing
    from emulate.planner.deployment import kv_repeat
    from emulate.planner.simulation import forward_spec, simulate
    from emulate.problem import resolve_patterns
    from emulate.runtime.threads import cores as usable_cores
    from graphs import CompactGraph
    from graphs.plan import make_plan

    model = _probe_model("float32", **KERNEL_PROBE_SHAPE)  # float32, as runs default
    _, n, m, att = KERNEL_PROBE
    dev = _device({**entry, "loaded_call_s": entry["serial_call_s"], "kernel_probe_miss": 1.0})  # fitted here
    spec = forward_spec(model.config, n, m, resolve_patterns(model.config, att), 4)
    graph = CompactGraph.build(spec)
    plan = make_plan(graph, 1, runnable=False)  # the local executor's: one queue
    copy = kv_repeat(model.config, dev, 4)
    fitted, own_miss = [], 1.0
    for k in range(1, len(entry["serial_call_s"]) + 1):
        run(model, random_tokens=2 * m, block_size=m, attention=att, collect=False, threads=k)  # warm-up
        got = statistics.median(run(model, random_tokens=n, block_size=m, attention=att, collect=False,
                                    threads=k).stats["forward_s"] for _ in range(ROUNDS))
        floor = dev.serial_call_s[k - 1]
        slowdown, _ = cpu_sharing(dev, k, False, usable_cores())

        def simulated(per_call: float, k=k, slowdown=slowdown) -> float:
            table = list(dev.serial_call_s)
            table[k - 1] = per_call
            hw = Hardware(replace(dev, loaded_call_s=tuple(table)), k, 1, CPU_LINK_GBPS, CPU_LINK_LATENCY_S, 0.0,
                          "fp32", slowdown, shared=True, call_tokens=m, **copy)
            return simulate(plan, spec, graph.spans, hw).makespan
        if k == 1:
            own_miss = got / simulated(floor)  # the model's miss on this forward with one worker
            fitted.append(floor)
            continue
        target = got / own_miss
        if simulated(floor) >= target:
            fitted.append(floor)
            continue
        low, high = floor, 2 * floor
        while simulated(high) < target and high < 1.0:
            low, high = high, 2 * high
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (mid, high) if simulated(mid) < target else (low, mid)
        fitted.append(high)
    return fitted, own_miss


# One worker process of `_worker_contention`: Ray's worker niceness, one torch thread; for every line
# read (a window in seconds), kernel mixes back to back through it, its rate written back
_WORKER = """
import os, sys, time
os.nice(int(sys.argv[1]))
import torch
torch.set_num_threads(1)
from emulate.planner.calibrate import _kernel_mix, _mix_rate
mix = _kernel_mix()
with torch.no_grad():
    mix()
    print("ready", flush=True)
    for line in sys.stdin:
        done, elapsed = _mix_rate(mix, float(line))
        print(done / elapsed, flush=True)
"""


def _worker_contention(alone: float, nice: int = RAY_WORKER_NICENESS, budget_s: float = 2.0) -> list[float]:
    """[f_1, ..., f_C]: how much longer the kernel mix takes on each of k one-thread worker processes
    running it at once, at the niceness Ray starts its workers at (`nice`, ray_worker_niceness()),
    than `alone` (one mix on one thread of this process, `_contention`), from
    their summed rates through a window, the median of ROUNDS windows per k: f_1 against `alone`
    (at least 1), f_k against f_1 (a worker process's own rate, so that a process's few percent
    against a thread do not count k times), times f_1. A Ray worker at that
    niceness gives its core to any process of normal priority: beside one busy neighbour on two
    cores, two workers share the one core it leaves (about 2x), where two threads of normal
    priority share both with it (about 1.5x)."""
    import statistics
    import subprocess

    from emulate.errors import EmulateError
    from emulate.runtime.threads import cores as usable_cores

    root = str(Path(__file__).resolve().parents[2])  # where the emulate package is imported from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(nice)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
             for _ in range(min(8, usable_cores()))]
    window = budget_s / ROUNDS / len(procs)
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise EmulateError("the CPU calibration could not start its worker processes (`python -c` "
                                   "with emulate on PYTHONPATH)")
        out = []
        for k in range(1, len(procs) + 1):
            rounds = []
            for _ in range(ROUNDS):
                for p in procs[:k]:
                    p.stdin.write(f"{window}\n")
                    p.stdin.flush()
                rounds.append(sum(float(p.stdout.readline()) for p in procs[:k]))
            if k == 1:  # one worker process alone: the baseline of the others, as slow as a thread alone or slower
                one = statistics.median(rounds)
                out.append(max(1.0, 1 / (one * alone)))
            else:
                out.append(_factor(k, rounds, 1 / one) * out[0])
        return out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _call_overhead() -> list[float]:
    """[c_1, ..., c_C]: wall seconds per logical call beyond its FLOPs with k call workers: forwards
    of a model so narrow that the calls are all overhead (node dispatch, mask building, merges: Python
    that holds the GIL), run by the local executor on k call workers (emulate/runtime/local.py; one
    runs in the calling thread), the fastest of ROUNDS per k. With k workers the Python of k calls
    cannot run at once, so c_k is the wall time per call of the whole run, not of a worker: the
    simulation (emulate/planner/simulation.py) runs this share of a task's time one task at a time
    across the local executor's workers. The forward's fixed costs (the schedule's start, the call
    workers' threads) are in it, spread over the probe's calls."""
    from emulate.api import run
    from emulate.runtime.threads import cores as usable_cores

    model = _probe_model(width=16, heads=2, kv_heads=1, head_dim=8, mlp_width=32)
    (_, warm_n, warm_m, warm_att), (_, n, m, att) = PROBE_FORWARDS
    out = []
    for k in range(1, min(8, usable_cores()) + 1):
        run(model, random_tokens=warm_n, block_size=warm_m, attention=warm_att, collect=False, threads=k)  # warm-up
        best = float("inf")
        for _ in range(ROUNDS):
            probe = run(model, random_tokens=n, block_size=m, attention=att, collect=False, threads=k)
            best = min(best, probe.stats["forward_s"] / probe.stats["graph_nodes"])
        out.append(best)
    return out


def _probe_model(dtype: str = "float64", **shape):
    """The calibration's probe model: a seeded two-layer Llama of the given shape (never a preset),
    weights in `dtype`."""
    import torch

    from emulate.models.loaders import Model
    from emulate.models.presets import weight_names

    config = ModelConfig(name=PROBE, family="llama", vocab=64, layers=2, **shape)
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(size, generator=gen, dtype=getattr(torch, dtype)) / size[-1] ** 0.5
               for name, size in weight_names(config).items()}
    return Model(config, weights)
