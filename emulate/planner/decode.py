"""Decode rows: the time per output token of generation on a layout, before anything runs.

Generation (emulate/runtime/decode.py, docs/generation.md) runs each new token through every layer
as small calls: per layer the token's projection, one pair call per key block it may see (at most
M keys each; exact causal: ceil((t + 1) / M) calls, a window or sinks: O(1)), the merge of the
partials, and the mix (out-projection and MLP). At batch 1 every call is bound by the bytes it
reads, so a step costs, layer by layer:

    weights     the layer's weights read once (bytes / memory bandwidth of the worker's G GPUs, on a
                calibrated CPU the measured cold read rate of one token's linear at the size of the
                layer's mean matrix, Device.reads_per_s; fp8 feed-forward weights one byte each,
                emulate/planner/deployment.py)
    KV          the keys and values of the visible blocks read once, on the workers that hold them
                (at the same read rates)
    calls       each call's fixed cost (the device's call overhead, emulate/planner/costs.py)
    TP          two all-reduces of the token's activations inside a worker of G GPUs (after the
                out-projection and after the MLP): NCCL's ring latency model plus the ring's bytes
    hops        with the cache on P workers (the prefill's runs of blocks, graphs/plan.py `place`;
                generated tokens join the last block's worker, which runs the dense work): the query
                sent down a tree to the workers holding visible blocks and their partials merged
                back up it, ceil(log2 P') hops each way, each the link's latency plus the bytes

The workers attend their own blocks at once (the slowest counts); everything else is in sequence.
`predict_decode` returns a `DecodePrediction`, the mean over the steps of K new tokens (the first
comes from the prefill, as generation's time per output token counts them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig, check_positions
from emulate.planner.costs import GB, Hardware, ring_allreduce_s
from graphs import MaskKind, pair_mask

# NCCL's own latency model of a ring all-reduce in the LL protocol, the one it picks for messages of
# a few kilobytes (NVIDIA/nccl, src/graph/tuning.cc, baseLat and hwLat, "Latencies in us"): a base
# of 3.6 us plus, per step, 0.47 us over NVLink or 1.0 us over PCIe; a ring all-reduce of p GPUs
# takes 2 (p - 1) steps. Constants of that file, not measured here (docs/planner.md).
NCCL_RING_LL_BASE_S = 3.6e-6
NCCL_RING_LL_STEP_S = {"nvlink": 0.47e-6, "pcie": 1.0e-6}
MAX_NEW_TOKENS = 10**6  # each step is priced on its own: past this, a plan is a wait, not an answer


@dataclass
class DecodePrediction:
    """What `predict_decode` returns: seconds per output token and where they go (mean over the steps)."""

    seconds_per_token: float
    parts: dict  # seconds per token: weights, kv, calls, tp_allreduce, hops
    calls_per_token: float  # every call of a step (embed, projections, pair calls, merges, mixes, head)
    attention_calls_per_token: float  # pair calls over all layers, as generation's stats count them
    weight_bytes_per_token: float
    kv_bytes_per_token: float  # keys and values read per step, over all layers
    hops_per_token: float  # link hops on the critical path per step (query out, partials back)
    kv_gb_per_worker: list[float]  # each worker's cache once the last token is in
    peak_worker_memory_gb: float  # weights plus the fullest worker's cache
    weights_gb_per_worker: float
    fits: bool
    refusal: str | None
    inputs: dict = field(default_factory=dict)

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds_per_token

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**out.pop("inputs"), **out, "ms_per_token": self.ms_per_token}


def allreduce_s(nbytes: float, gpus: int, hw: Hardware, tp_link: str) -> float:
    """One all-reduce of `nbytes` over a worker's `gpus` GPUs: NCCL's ring latency plus the ring's
    bandwidth term (emulate/planner/costs.py, ring_allreduce_s)."""
    if gpus <= 1 or not hw.tp_bytes_per_s:
        return 0.0
    latency = NCCL_RING_LL_BASE_S + 2 * (gpus - 1) * NCCL_RING_LL_STEP_S[tp_link]
    return latency + ring_allreduce_s(nbytes, gpus, hw.tp_bytes_per_s)


def layer_weight_bytes(config: ModelConfig, weight_dtype: str, b: int) -> tuple[float, float]:
    """(attention projections and pre-norm, out-projection + MLP and its norm) bytes of one layer."""
    d = config.width
    q_kv = d * (config.heads + 2 * config.kv_heads) * config.head_dim
    out = config.heads * config.head_dim * d
    ffn = (3 if config.mlp == "swiglu" else 2) * d * config.mlp_width
    ffn_b = 1 if weight_dtype == "fp8-ffn" else b
    return float((q_kv + d) * b), float(out * b + ffn * ffn_b + d * b)


def weight_bytes_per_token(config: ModelConfig, weight_dtype: str, b: int) -> float:
    """Every weight a step reads: each layer's, the final norm, the head (vocab x width, tied or
    not) and one row of the embedding."""
    proj, mix = layer_weight_bytes(config, weight_dtype, b)
    head = config.vocab * config.width * b if config.lm_head else 0
    return config.layers * (proj + mix) + config.width * b + head + config.width * b


def block_owners(blocks: int, workers: int, patterns, block_size: int, config: ModelConfig) -> list[int]:
    """The worker that holds each prompt block's keys: contiguous runs of about equal work, the
    same run every layer, as graphs/plan.py `place` lays out the prefill (work: the block's dense
    FLOPs plus its pair calls' score entries)."""
    from emulate.planner.deployment import layer_gemm_flops
    from graphs.plan import balanced_runs

    proj, ffn = layer_gemm_flops(config)
    pattern = patterns[0]
    work = []
    for i in range(blocks):
        lo, hi = i * block_size, (i + 1) * block_size
        seen = 0
        for t in (lo, hi - 1):  # the block's first and last rows, averaged: exact for a causal ramp
            r = pattern.key_range([t])
            seen += int(r.hi[0] - r.lo[0]) + int(r.sink_hi[0])
        work.append(block_size * (proj + ffn) + 4 * config.heads * config.head_dim * block_size * seen / 2)
    return balanced_runs(work, workers)


def predict_decode(model=None, tokens: int = 4096, new_tokens: int = 16, *, block_size: int = 256,
                   attention="auto", window: int | None = None, sinks: int | None = None, workers: int = 1,
                   device: str = "cpu", gpus_per_worker: int = 1, link_gbps: float | None = None,
                   recalibrate: bool = False, weight_dtype: str = "bf16", tp_link: str = "nvlink",
                   allow_overcommit: bool = False, allow_past_positions: bool = False,
                   hw: Hardware | None = None) -> DecodePrediction:
    """Predict generation's time per output token: `new_tokens` K after a prompt of `tokens` N, on
    `workers` workers of `gpus_per_worker` devices (the module docstring's model; nothing runs).

    model: a preset, a checkpoint directory, an emulate.Model or a published shape. The cache stays
    where the prefill made it (the sequence placement); on the cpu generation runs on the local
    executor, one worker. A layout whose weights and cache do not fit a worker is refused
    (EmulateError naming what would fit) unless allow_overcommit; N + K past the model's position
    limit (learned positions, or a RoPE model's max_position_embeddings) unless allow_past_positions
    (RoPE only). `hw` overrides the hardware (emulate/planner/prediction.py, hardware).
    """
    from dataclasses import replace

    from emulate.planner.deployment import deployment, fit_refusal, weights_bytes
    from emulate.planner.prediction import _config, hardware
    from emulate.problem import resolve_patterns

    config = _config(model)
    for name, value, low in (("--tokens", tokens, 1), ("--new-tokens", new_tokens, 2), ("--block-size", block_size, 1),
                             ("--workers", workers, 1), ("--gpus-per-worker", gpus_per_worker, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EmulateError(f"{name} must be an integer >= {low}, got {value!r}")
    if new_tokens > MAX_NEW_TOKENS:
        raise EmulateError(f"--new-tokens {new_tokens} is past the {MAX_NEW_TOKENS} a decode plan prices step by step")
    if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
        raise EmulateError(f"--link-gbps must be a finite number > 0, got {link_gbps}")
    if not config.lm_head or not config.causal:
        raise EmulateError(f"{config.name} has no language-model head (an encoder): it cannot generate")
    check_positions(config, tokens, new_tokens, allow_past_positions)
    patterns = resolve_patterns(config, attention, window, sinks)
    if not all(p.causal for p in patterns):
        raise EmulateError(f"generation needs a causal mask on every layer (causal, sliding or sink), "
                           f"not {patterns[0].describe()}")
    if device == "cpu" and workers != 1:
        raise EmulateError("generation on the cpu runs on the local executor: one worker (--workers 1)")
    if hw is None:
        hw = hardware(device, workers, gpus_per_worker, link_gbps, recalibrate, "local" if device == "cpu" else "ray")
    b = 2 if hw.dtype == "bf16" else 4
    hw = replace(hw, **deployment(config, device, hw.device, hw.gpus_per_worker, weight_dtype, tp_link, b))
    P, G, dev = (1 if hw.shared else hw.workers), hw.gpus_per_worker, hw.device
    M, N, K = block_size, tokens, new_tokens

    prompt_blocks = math.ceil(N / M)
    owners = block_owners(prompt_blocks, P, patterns, M, config)
    tail_worker = owners[-1]

    def owner(j: int) -> int:
        return owners[j] if j < prompt_blocks else tail_worker

    # what each worker holds once the last token is in: the weights (every worker, the sequence
    # placement) and its blocks' keys and values
    kv_token = 2 * config.layers * config.kv_heads * config.head_dim * b
    last = N + K - 1  # the last position the cache holds
    kv_held = [0.0] * P
    for j in range(last // M + 1):
        kv_held[owner(j)] += kv_token * (min(last + 1, (j + 1) * M) - j * M)
    weights = weights_bytes(config, weight_dtype, b)
    fp8 = weights_bytes(config, "fp8-ffn", b) if "fp8" in dev.flops else None
    fullest = max(range(P), key=kv_held.__getitem__)
    refusal = fit_refusal(weights + kv_held[fullest], weights, fp8, dev, G)
    if refusal and not allow_overcommit:
        raise EmulateError(refusal)

    proj_b, mix_b = layer_weight_bytes(config, weight_dtype, b)
    proj_f, ffn_f = _gemm_flops(config)
    head_b = config.vocab * config.width * b
    layer_matrices = _layer_matrices(config)
    over = dev.call_overhead_s

    def dense(nbytes: float, flops: float, matrices: int) -> float:
        # one token's GEMVs: bound by the weights' bytes on every device priced (fp8's faster GEMM
        # rate does not enter; its one byte per weight does), read at the rate of their mean
        # matrix's size (a GPU's datasheet bandwidth; this CPU's measured cold reads)
        return max(nbytes / (G * dev.reads_per_s(nbytes / matrices / G)),
                   flops / (G * dev.rate(hw.dtype, "matmul", flops)))

    q_bytes = config.heads * config.head_dim * b
    partial_bytes = config.heads * (config.head_dim + 1) * b
    hop = hw.link_latency_s
    link = hw.link_bytes_per_s
    act_bytes = config.width * b
    ar = allreduce_s(act_bytes, G, hw, tp_link)
    from emulate.runtime.decode import visible_blocks

    batched = device == "cpu"  # the CPU kernel batches a worker's full blocks; a GPU runs one call per block

    totals = dict.fromkeys(("weights", "kv", "calls", "tp_allreduce", "hops"), 0.0)
    calls_sum = pairs_sum = kv_sum = hops_sum = 0.0
    steps = K - 1
    layer_fixed = dense(proj_b, proj_f, layer_matrices[0]) + dense(mix_b, ffn_f, layer_matrices[1])
    head_s = dense(head_b + 2 * config.width * b, 2.0 * config.vocab * config.width, 1)
    for t in range(N, N + steps):
        step = {"weights": layer_fixed * config.layers + head_s, "kv": 0.0, "tp_allreduce": 2 * ar * config.layers,
                "hops": 0.0, "calls": 2 * over}  # embed and head
        calls, pairs, kv_bytes, hops = 2, 0, 0.0, 0
        per_pattern: dict = {}
        for pattern in patterns:
            if pattern not in per_pattern:
                per_pattern[pattern] = _layer_attention(pattern, t, M, owner, tail_worker, P, config, b, dev, G, hw,
                                                        over, q_bytes, partial_bytes, hop, link, visible_blocks,
                                                        batched)
            a = per_pattern[pattern]
            step["kv"] += a["kv_s"]
            step["calls"] += a["calls_s"] + 2 * over  # the projection and the mix
            step["hops"] += a["hops_s"]
            calls += a["calls"] + 2
            pairs += a["pairs"]
            kv_bytes += a["kv_bytes"]
            hops += a["hops"]
        for k, v in step.items():
            totals[k] += v
        calls_sum, pairs_sum, kv_sum, hops_sum = calls_sum + calls, pairs_sum + pairs, kv_sum + kv_bytes, hops_sum + hops
    parts = {k: v / steps for k, v in totals.items()}
    inputs = {"model": config.name, "tokens": N, "new_tokens": K, "block_size": M, "layers": config.layers,
              "attention": sorted({str(p.describe()) for p in patterns}), "placement": "sequence",
              "workers": P, "device": dev.name, "gpus_per_worker": G, "link_gbps": hw.link_gbps, "dtype": hw.dtype,
              "weight_dtype": weight_dtype, "tp_link": tp_link if G > 1 else None,
              "executor": "local" if device == "cpu" else None,
              "calibration": dev.calibration.to_dict() if dev.calibration else None}
    return DecodePrediction(
        seconds_per_token=sum(parts.values()), parts=parts, calls_per_token=calls_sum / steps,
        attention_calls_per_token=pairs_sum / steps, weight_bytes_per_token=weight_bytes_per_token(config, weight_dtype, b),
        kv_bytes_per_token=kv_sum / steps, hops_per_token=hops_sum / steps, kv_gb_per_worker=[k / GB for k in kv_held],
        peak_worker_memory_gb=(weights + kv_held[fullest]) / GB, weights_gb_per_worker=weights / GB,
        fits=refusal is None, refusal=refusal, inputs=inputs)


def _layer_matrices(config: ModelConfig) -> tuple[int, int]:
    """(projections q, k, v; out-projection + MLP) weight matrices of one layer, each its own linear
    (emulate/models/block.py)."""
    return 3, 1 + (3 if config.mlp == "swiglu" else 2)


def _gemm_flops(config: ModelConfig) -> tuple[float, float]:
    """(projections q, k, v; out-projection + MLP) FLOPs of one token through one layer."""
    d = config.width
    qkv = 2.0 * d * (config.heads + 2 * config.kv_heads) * config.head_dim
    out = 2.0 * config.heads * config.head_dim * d
    return qkv, out + 2.0 * (3 if config.mlp == "swiglu" else 2) * d * config.mlp_width


def _layer_attention(pattern, t, M, owner, tail_worker, P, config, b, dev, G, hw, over, q_bytes, partial_bytes, hop,
                     link, visible_blocks, batched: bool) -> dict:
    """One layer's attention for the token at position t: each worker's pair calls over its visible
    blocks (the slowest worker counts), its local merge, and the hops between workers. batched: the
    worker attends its full blocks in one kernel invocation and merges the partials in one stacked
    step (the kernel oracle's attend_blocks on the CPU, emulate/runtime/decode.py), so it pays the
    fixed cost of those invocations, not one per block; the calls counted stay one per block, as
    generation counts them."""
    per_worker: dict[int, list[int]] = {}
    kv_bytes = 0.0
    for j in visible_blocks(pattern, t, M):
        keys = min(M, t + 1 - j * M)
        # a whole block that sees every key goes into the batched invocation (Decoder's KVCache.attend)
        whole = keys == M and pair_mask(pattern, (t, t + 1), (j * M, j * M + M)).kind == MaskKind.NONE
        per_worker.setdefault(owner(j), []).append((keys, whole))
        kv_bytes += 2 * config.kv_heads * config.head_dim * keys * b
    slowest, calls, slow_calls = 0.0, 0, 0.0
    for blocks in per_worker.values():
        n = len(blocks) + (1 if len(blocks) > 1 else 0)  # its pair calls and, past one, their merge
        calls += n
        if batched:  # the whole blocks in one kernel invocation, the others one each, one stacked merge
            whole = sum(1 for _, w in blocks if w)
            n = (1 if whole else 0) + (len(blocks) - whole) + (1 if len(blocks) > 1 else 0)
        held = sum(2 * config.kv_heads * config.head_dim * k * b for k, _ in blocks)
        mem = held / (G * dev.reads_per_s(held / 2 / G))  # the keys, then the values: two reads of half
        flops = sum(4 * config.heads * config.head_dim * k for k, _ in blocks)
        rate = dev.rate(hw.dtype, "attention", flops / len(blocks)) * G
        s = max(mem, flops / rate)
        if s + n * over >= slowest + slow_calls:
            slowest, slow_calls = s, n * over
    active = len(per_worker | {tail_worker: []})
    depth = math.ceil(math.log2(active)) if active > 1 else 0
    hops_s = depth * (2 * hop + q_bytes / link + partial_bytes / link)
    merges = active - 1  # the tree's merges across workers; `depth` of them on the critical path
    calls += merges
    return {"kv_s": slowest, "calls_s": slow_calls + depth * over, "hops_s": hops_s, "calls": calls,
            "pairs": sum(len(v) for v in per_worker.values()), "kv_bytes": kv_bytes, "hops": 2 * depth}
