"""Memory: the process's own peak resident memory (the summary's peak_rss_mb), and the estimate of what a
run will hold (estimate), refused before any work when it cannot fit (check_fits)."""
from __future__ import annotations

import resource

from graphs.patterns import windowed


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


GRAPH_NODE_BYTES = 2048  # a networkx node with its attributes and ~3 edges: 1.5 KB measured at 2M nodes
PLAN_NODE_BYTES = 1280  # a runnable physical plan (graphs/plan.py), per logical node: 1.1 KB measured at 135K nodes
COMPACT_PAIR_BYTES = 512  # a compact graph's template, per pair of a distinct layer pattern: ~190 B measured


def estimate(config, tokens: int, block_size: int, patterns, dtype_bytes: int, collect: bool = False,
             verify: bool = False, *, run: bool = True, graph: str = "networkx") -> dict[str, int]:
    """Bytes a run will hold at its peak, by part, worked out before anything is allocated.

    Upper estimates from the shapes alone: the token ids (and their generation), the logical graph
    (every node; pairs at the pattern's bound), the local executor's live set (a layer's residuals,
    projections and one row's partials; a window's worth of blocks for windowed masks), the
    collected outputs, and the monolithic reference of `verify`, which holds every position at
    once (its MLP included).

    run=False prices a compile alone (the graph, no live set). graph: the form the graph is held
    in: "networkx" (every node), "compact" (graphs/compact.py: one template per distinct layer
    pattern), or "plan" (the Ray executor's: the compact form and a physical plan whose tasks carry
    every node's attributes).
    """
    from math import ceil

    n = int(tokens)
    blocks = ceil(n / block_size)
    w, qkv = config.width, (config.heads + 2 * config.kv_heads) * config.head_dim
    pairs = sum(p.calls_bound(blocks, block_size) for p in patterns)
    nodes = pairs + 5 * blocks * len(patterns) + 2 * blocks
    templates = {p: p.calls_bound(blocks, block_size) for p in patterns}
    compact = COMPACT_PAIR_BYTES * (sum(templates.values()) + blocks)
    graph_bytes = {"compact": compact, "plan": compact + PLAN_NODE_BYTES * nodes}.get(graph, GRAPH_NODE_BYTES * nodes)
    parts = {"token ids": 16 * n, "graph": graph_bytes}
    if not run:
        return parts
    per_token = (2 * w + qkv + config.heads * config.head_dim) * dtype_bytes
    if windowed(p.kind for p in patterns):
        reach = max(p.window + (p.sinks or 0) for p in patterns) + 2 * block_size
        parts["live set"] = per_token * min(n, reach) * len(patterns)
    else:
        parts["live set"] = per_token * n
    if collect or verify:
        parts["outputs"] = (w + 1) * dtype_bytes * n
    if verify:
        parts["reference"] = (6 * w + 2 * qkv + 4 * config.mlp_width) * dtype_bytes * n
    return parts


def check_fits(parts: dict[str, int], what: str = "this run") -> None:
    """Refuse, in one line, a run that cannot fit in the memory this machine has available now."""
    import psutil

    from emulate.errors import EmulateError

    need = sum(parts.values())
    have = psutil.virtual_memory().available
    if need > have:
        top = ", ".join(f"{k} {size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 2**27)
        raise EmulateError(f"{what} would hold about {size(need)} ({top}), more than the {size(have)} this machine "
                           "has available")


def size(nbytes: float) -> str:
    for unit in ("GiB", "TiB", "PiB"):
        nbytes /= 2**30 if unit == "GiB" else 2**10
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes:.0f} PiB"
