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

What it leaves out, as the planner does: norms, rotary embedding and the merge of partials (memory
bound, a small share at these lengths), and the LM head (a prefill needs the last token's logits).
"""
from __future__ import annotations

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
    tokens_per_node: int
    gemm_s: float  # the forward's GEMMs, all layers
    allreduce_s: float  # tensor parallelism's all-reduces, all layers
    attention_s: float  # the ring's steps, each max(attention, transfer), all layers
    attention_compute_s: float  # ... the attention alone
    transfer_s: float  # the keys and values passed between nodes, all steps and layers (overlapped)
    exposed_transfer_s: float  # what the transfers add beyond the attention they overlap
    call_overhead_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict_ring(model, tokens: int, *, nodes: int, gpus_per_node: int = 8, device: str = "h100",
                 weight_dtype: str = "bf16", link_gbps: float = GPU_LINK_GBPS) -> RingPrediction:
    """One prefill of `tokens` on `nodes` nodes of `gpus_per_node` GPUs laid out as the module docstring
    says (pass-KV ring attention, load-balanced chunks, tensor parallel inside a node). link_gbps:
    each GPU's NIC between nodes (default 400 Gb/s, as costs.py sources it)."""
    from emulate.planner.prediction import _config

    config: ModelConfig = _config(model)
    if device not in DEVICES or device not in NVLINK_BYTES_PER_S:
        raise EmulateError(f"the ring baseline prices GPUs ({', '.join(DEVICES)}), not {device!r}")
    for name, value in (("tokens", tokens), ("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EmulateError(f"{name} must be an integer >= 1, got {value!r}")
    if weight_dtype not in ("bf16", "fp8-ffn"):
        raise EmulateError(f"weight_dtype must be bf16 or fp8-ffn, got {weight_dtype!r}")
    dev = DEVICES[device]
    G, C, L = gpus_per_node, nodes, config.layers
    local = tokens / C  # tokens per node
    chunk = tokens / (2 * C)
    proj, ffn = layer_gemm_flops(config)
    bf16 = dev.flops["bf16"] * dev.efficiency
    ffn_rate = FP8_GEMM_FLOPS.get(device, bf16) if weight_dtype == "fp8-ffn" else bf16
    gemm = L * local * (proj / bf16 + ffn / ffn_rate) / G
    allreduce = L * 2 * ring_allreduce_s(local * config.width * 2, G, NVLINK_BYTES_PER_S[device]) if G > 1 else 0.0

    heads_per_gpu = config.heads / G
    per_score = 4 * config.head_dim * heads_per_gpu  # FLOPs of one visible score on one GPU
    first = 2 * chunk**2 * per_score / dev.attention_at("causal", int(chunk))  # own chunks: two causal, one full
    step = 2 * chunk**2 * per_score / dev.attention_at("none", int(chunk))  # 2c queries on c keys, unmasked
    kv_bytes = local * 2 * max(1.0, config.kv_heads / G) * config.head_dim * 2
    transfer = GPU_LINK_LATENCY_S + kv_bytes / (link_gbps * 1e9 / 8) if C > 1 else 0.0
    # step s computes on the keys it holds while the next ones arrive: max(compute, transfer) for the
    # first C - 1 steps, the last step's compute alone
    steps = [first] + [step] * (C - 1)
    ring = sum(max(s, transfer) for s in steps[:-1]) + steps[-1]
    compute = sum(steps)
    calls = L * (C + 6) * GPU_CALL_OVERHEAD_S  # per layer: C attention steps, 4 GEMMs, 2 all-reduces
    total = gemm + allreduce + L * ring + calls
    return RingPrediction(predicted_s=total, nodes=C, gpus_per_node=G, tokens_per_node=int(local), gemm_s=gemm,
                          allreduce_s=allreduce, attention_s=L * ring, attention_compute_s=L * compute,
                          transfer_s=L * transfer * (C - 1), exposed_transfer_s=L * (ring - compute),
                          call_overhead_s=calls)
