"""The ring baseline: context parallelism as Meta's long-context prefill deploys it, priced from the
same sourced constants as the planner (emulate/planner/costs.py), so that a published run of that
deployment can be compared with the model and the executor's placements with it.

The layout (Yang et al., "Context Parallelism for Scalable Million-Token Inference", arXiv
2411.01783, the pass-KV ring attention it describes): C nodes of G GPUs, tensor parallel over
NVLink inside a node (each GPU holds 1/G of every layer's heads and weights), context parallel
across nodes. The N tokens are cut into 2C chunks of c = N / 2C and node i holds chunks i and
2C - 1 - i (load-balanced sharding: every node does the same causal work). For every layer, each
node runs its N / C tokens' GEMMs (the feed-forward's in fp8 where asked), the two all-reduces of
tensor parallelism, and ring attention over C steps: at step 0 its queries attend its own keys and
values (two causal chunks and one full chunk pair: 2c^2 visible scores per head); at each of the C - 1
further steps it attends the keys and values the previous node handed on (half of the pair visible:
2c^2 scores, as one unmasked call of 2c queries on c keys) while it passes the ones it holds to the
next node. A step takes max(its attention, the transfer of the next step's keys and values): each
GPU sends its KV heads' share, N / C x 2 x (kv_heads / G) x head_dim x 2 bytes, over its own NIC.

A persistent-KV prefill (the paper's "partial prefill": T new tokens attending P tokens cached by
earlier turns and themselves) keeps the same layout for the T new tokens (2C balanced chunks) and
P / C cached tokens on every node. Each ring step then adds one unmasked call of the node's T / C
queries on the P / C cached keys it holds. The paper's two variants differ in what moves:

- pass-KV: the keys and values move, (P + T) / C tokens a step, as above;
- pass-Q: the queries move (T / C tokens of the GPU's query heads a step: 8 times the bytes a token
  of one KV head's keys and values for Llama-3 405B's 128 query and 8 KV heads, so fewer bytes only
  when the new tokens are under 1/8 of the context), and the partial outputs
  then go back to the nodes that own their queries in one all-to-all after the ring (each GPU sends
  C - 1 blocks of T / C rows: bf16 outputs and a float32 log-sum-exp), on the critical path.

What it leaves out, as the planner does: norms, rotary embedding and the merge of partials (memory
bound, a small share at these lengths), and the LM head (a prefill needs the last token's logits).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig
from emulate.planner.costs import (
    DEVICES,
    FP8_GEMM_FLOPS,
    GPU_CALL_OVERHEAD_S,
    GPU_LINK_GBPS,
    GPU_LINK_LATENCY_S,
    NVLINK_BYTES_PER_S,
    ring_allreduce_s,
)
from emulate.planner.deployment import layer_gemm_flops


@dataclass(frozen=True)
class RingPrediction:
    """What `predict_ring` returns: the forward's time and where it goes, per layer and in all."""

    predicted_s: float
    nodes: int
    gpus_per_node: int
    tokens_per_node: int  # new tokens (queries) per node
    cached: int  # tokens cached before this prefill (0: a full prefill)
    variant: str  # "pass-kv" or "pass-q"
    gemm_s: float  # the forward's GEMMs, all layers
    allreduce_s: float  # tensor parallelism's all-reduces, all layers
    attention_s: float  # the ring's steps, each max(attention, transfer), all layers
    attention_compute_s: float  # ... the attention alone
    transfer_s: float  # what the ring passes between nodes, all steps and layers (overlapped)
    exposed_transfer_s: float  # what the transfers add beyond the attention they overlap
    all_to_all_s: float  # pass-Q's return of the partial outputs after the ring, all layers (0 for pass-KV)
    call_overhead_s: float

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS = ("pass-kv", "pass-q")


def predict_ring(model, tokens: int, *, nodes: int, gpus_per_node: int = 8, device: str = "h100",
                 weight_dtype: str = "bf16", link_gbps: float = GPU_LINK_GBPS, cached: int = 0,
                 variant: str = "pass-kv") -> RingPrediction:
    """One prefill of `tokens` new tokens on `nodes` nodes of `gpus_per_node` GPUs laid out as the
    module docstring says (ring attention over load-balanced chunks, tensor parallel inside a node),
    after `cached` tokens already in the cache (0: a full prefill). variant: "pass-kv" (keys and
    values move) or "pass-q" (queries move, outputs return in an all-to-all). link_gbps: each GPU's
    NIC between nodes (default 400 Gb/s, as costs.py sources it)."""
    from emulate.planner.prediction import _config

    config: ModelConfig = _config(model)
    if device not in DEVICES or device not in NVLINK_BYTES_PER_S:
        raise EmulateError(f"the ring baseline prices GPUs ({', '.join(DEVICES)}), not {device!r}")
    for name, value, least in (("nodes", nodes, 1), ("gpus_per_node", gpus_per_node, 1), ("cached", cached, 0),
                               ("tokens", tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise EmulateError(f"{name} must be an integer >= {least}, got {value!r}")
    if tokens < 2 * nodes:
        raise EmulateError(f"tokens must be at least 2 x nodes = {2 * nodes} (a token in each chunk), got {tokens}")
    if isinstance(link_gbps, bool) or not isinstance(link_gbps, (int, float)) or not math.isfinite(link_gbps) \
            or link_gbps <= 0:
        raise EmulateError(f"link_gbps must be a finite number > 0, got {link_gbps!r}")
    if weight_dtype not in ("bf16", "fp8-ffn"):
        raise EmulateError(f"weight_dtype must be bf16 or fp8-ffn, got {weight_dtype!r}")
    if variant not in VARIANTS:
        raise EmulateError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    dev = DEVICES[device]
    G, C, L = gpus_per_node, nodes, config.layers
    local = tokens / C  # new tokens (queries) per node
    chunk = tokens / (2 * C)
    held = cached / C  # cached tokens per node
    proj, ffn = layer_gemm_flops(config)
    bf16 = dev.flops["bf16"] * dev.efficiency
    ffn_rate = FP8_GEMM_FLOPS.get(device, bf16) if weight_dtype == "fp8-ffn" else bf16
    gemm = L * local * (proj / bf16 + ffn / ffn_rate) / G
    allreduce = L * 2 * ring_allreduce_s(local * config.width * 2, G, NVLINK_BYTES_PER_S[device]) if G > 1 else 0.0

    heads_per_gpu = config.heads / G
    per_score = 4 * config.head_dim * heads_per_gpu  # FLOPs of one visible score on one GPU
    # every step: the node's queries on the cached keys it holds, one unmasked call (a rectangle
    # runs at FA3's rate for its shorter side)
    on_cached = local * held * per_score / dev.attention_at("none", int(min(local, held))) if held else 0.0
    first = on_cached + 2 * chunk**2 * per_score / dev.attention_at("causal", int(chunk))  # own chunks: two causal, one full
    step = on_cached + 2 * chunk**2 * per_score / dev.attention_at("none", int(chunk))  # 2c queries on c keys, unmasked
    if variant == "pass-kv":
        moved = (cached + tokens) / C * 2 * max(1.0, config.kv_heads / G) * config.head_dim * 2
    else:
        moved = local * heads_per_gpu * config.head_dim * 2
    link = link_gbps * 1e9 / 8
    transfer = GPU_LINK_LATENCY_S + moved / link if C > 1 else 0.0
    # step s computes on what it holds while the next block arrives: max(compute, transfer) for the
    # first C - 1 steps, the last step's compute alone
    steps = [first] + [step] * (C - 1)
    ring = sum(max(s, transfer) for s in steps[:-1]) + steps[-1]
    compute = sum(steps)
    all_to_all = 0.0
    if variant == "pass-q" and C > 1:
        outputs = (C - 1) * local * heads_per_gpu * (config.head_dim * 2 + 4)  # bf16 rows and their log-sum-exp
        all_to_all = GPU_LINK_LATENCY_S + outputs / link
    # per layer: C attention steps (and one call on the cached keys in each), 4 GEMMs, 2 all-reduces (and
    # pass-Q's all-to-all)
    calls = L * (C * (1 + (held > 0)) + 6 + (all_to_all > 0)) * GPU_CALL_OVERHEAD_S
    total = gemm + allreduce + L * (ring + all_to_all) + calls
    return RingPrediction(predicted_s=total, nodes=C, gpus_per_node=G, tokens_per_node=int(local), cached=cached,
                          variant=variant, gemm_s=gemm, allreduce_s=allreduce, attention_s=L * ring,
                          attention_compute_s=L * compute, transfer_s=L * transfer * (C - 1),
                          exposed_transfer_s=L * (ring - compute), all_to_all_s=L * all_to_all,
                          call_overhead_s=calls)
