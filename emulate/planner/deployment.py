"""What a real deployment pays beyond the graph's own work (emulate/planner/costs.py prices it):
tensor parallelism inside a worker (an all-reduce of the block's activations after each layer's
attention and MLP, over NVLink or PCIe), the weights' dtype (bf16, or the feed-forward's in fp8 at
the fp8 GEMM rate, as docs/planner.md's published anchor deployed them), and whether the weights
plus the values alive fit each worker's memory (`fit_refusal`: one line naming what would fit)."""
from __future__ import annotations

import math

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig
from emulate.planner.costs import FP8_GEMM_FLOPS, GB, NVLINK_BYTES_PER_S, PCIE_BYTES_PER_S, Device

WEIGHT_DTYPES = ("bf16", "fp8-ffn")
TP_LINKS = ("nvlink", "pcie")
GPUS_PER_NODE = 8  # the HGX/DGX boards these datasheet parts come on


def ffn_parameters(config: ModelConfig) -> int:
    return config.layers * (3 if config.mlp == "swiglu" else 2) * config.width * config.mlp_width


def layer_gemm_flops(config: ModelConfig) -> tuple[float, float]:
    """(attention projections, feed-forward) GEMM FLOPs of one token through one layer."""
    d = config.width
    proj = 2 * d * (config.heads + 2 * config.kv_heads) * config.head_dim + 2 * config.heads * config.head_dim * d
    return float(proj), float(2 * (3 if config.mlp == "swiglu" else 2) * d * config.mlp_width)


def weights_bytes(config: ModelConfig, weight_dtype: str, dtype_bytes: int) -> float:
    from emulate.models.shapes import parameters

    total = parameters(config) * dtype_bytes
    if weight_dtype == "fp8-ffn":
        total -= ffn_parameters(config) * (dtype_bytes - 1)
    return float(total)


def kv_repeat(config: ModelConfig, dev: Device, dtype_bytes: int) -> dict:
    """The Hardware fields of the CPU kernels' key and value copy for a grouped-query model (costs.py,
    Hardware.kv_repeat_bytes); none on a GPU, whose kernels read the shared heads in place."""
    if dev.masked_attention is None or config.kv_heads == config.heads:
        return {}
    # read from the KV heads, written to every query head: the bytes the calibrated bandwidth counts
    # (a copy's reads and writes, emulate/planner/calibrate.py)
    return {"kv_repeat_bytes": 2.0 * (config.heads + config.kv_heads) * config.head_dim * dtype_bytes,
            "score_flops": 4.0 * config.heads * config.head_dim}


def deployment(config: ModelConfig, device: str, dev: Device, gpus_per_worker: int, weight_dtype: str,
               tp_link: str, dtype_bytes: int) -> dict:
    """The Hardware fields (emulate/planner/costs.py) of a worker of `gpus_per_worker` GPUs."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise EmulateError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    if tp_link not in TP_LINKS:
        raise EmulateError(f"--tp-link must be one of {', '.join(TP_LINKS)}, got {tp_link!r}")
    proj, ffn = layer_gemm_flops(config)
    fields = {"ffn_share": ffn / (proj + ffn), **kv_repeat(config, dev, dtype_bytes)}
    if weight_dtype == "fp8-ffn":
        if "fp8" not in dev.flops:
            raise EmulateError(f"--weight-dtype fp8-ffn needs a device with fp8 tensor cores; {device} has none")
        # the published fp8 GEMM rate over the bf16 one the device runs (costs.py: DeepGEMM, MAMF)
        fp8 = FP8_GEMM_FLOPS.get(device, dev.flops["fp8"] * dev.efficiency)
        fields["ffn_speedup"] = fp8 / (dev.flops["bf16"] * dev.efficiency)
    if gpus_per_worker > 1 and device in NVLINK_BYTES_PER_S:
        fields["tp_bytes_per_s"] = (NVLINK_BYTES_PER_S if tp_link == "nvlink" else PCIE_BYTES_PER_S)[device]
        # two all-reduces per token-layer (after attention's output projection and after the MLP)
        fields["allreduce_bytes_per_flop"] = 2 * config.width * dtype_bytes / (proj + ffn)
    return fields


def fit_refusal(peak: float, weights: float, fp8_weights: float | None, dev: Device, gpus: int,
                placement: str = "sequence") -> str | None:
    """None when `peak` bytes fit a worker of `gpus` devices; else one line: what it needs and what
    would fit (`weights`: that worker's, under the layers placement its range's)."""
    capacity = dev.memory * gpus
    if peak <= capacity:
        return None
    values = peak - weights
    fixes = []
    need = math.ceil(peak / dev.memory)
    if need <= GPUS_PER_NODE:
        fixes.append(f"--gpus-per-worker {need}")
    if fp8_weights is not None and fp8_weights < weights:
        need8 = math.ceil((values + fp8_weights) / dev.memory)
        if need8 <= gpus:
            fixes.append("--weight-dtype fp8-ffn")
        elif need8 <= GPUS_PER_NODE and (need8 < need or need > GPUS_PER_NODE):  # only where fp8 saves GPUs
            fixes.append(f"--weight-dtype fp8-ffn --gpus-per-worker {need8}")
    if values > capacity / 2:
        fixes.append("a smaller -M or more workers (the values alive per worker)")
    if not fixes and placement == "sequence":
        fixes.append(f"--placement layers (the weights need {need} GPUs, more than a node's {GPUS_PER_NODE}; "
                     "each worker would hold only its layers')")
    if not fixes:
        fixes.append("more workers (fewer layers each)")
    parts = f"weights {weights / GB:.0f} GB" + (f", values alive {values / GB:.0f} GB" if values > 0 else "")
    return (f"{peak / GB:.0f} GB per worker ({parts}) does not fit {gpus} x {dev.name} ({capacity / GB:.0f} GB): {' or '.join(fixes)} would; "
            "--allow-overcommit predicts it anyway")
