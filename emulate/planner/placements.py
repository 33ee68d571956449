"""The placements the planner prices, as the Ray executor places them (cluster/placement.py):

    sequence  every worker holds the whole model and runs every layer for its run of query blocks
              (graphs/plan.py `place`): context parallelism
    layers    each worker owns a contiguous range of layers and holds only their weights (the
              embedding on the first, the final norm and head on the last, and where a range ends
              the next layer's pre-norm and q, k, v projections, which ride with its last mix);
              every task of a layer runs on its owner, in the executor's pipeline order

`place` applies a placement to a counted plan (graphs/plan.py, runnable=False) with the executor's
own functions, so the simulation (emulate/planner/simulation.py) runs the plan the executor would;
`worker_weights` prices each worker's weights from the config's canonical weight names
(emulate/models/presets.py, weight_names) and the executor's `owned_weights`.

emulate never imports cluster (tests/test_layout.py): its placement functions are found by name,
as the executor registry finds the Ray executor (emulate/runtime/registry.py).
"""
from __future__ import annotations

import importlib
from enum import StrEnum

from emulate.errors import EmulateError
from emulate.models.config import ModelConfig

_EXECUTOR_PLACEMENT = "cluster.placement"
_FFN = ("gate.", "up.", "down.")


class PlannedPlacement(StrEnum):
    SEQUENCE = "sequence"
    LAYERS = "layers"


ALL = "all"
CHOICES = tuple(p.value for p in PlannedPlacement) + (ALL,)


def placement_of(value) -> PlannedPlacement:
    try:
        return PlannedPlacement(value)
    except ValueError:
        raise EmulateError(f"--placement must be one of {', '.join(CHOICES)}, got {value!r}") from None


def placements_of(value) -> list[PlannedPlacement]:
    """`all` -> every placement; a single name -> that one."""
    return list(PlannedPlacement) if value == ALL else [placement_of(value)]


def _executor():
    return importlib.import_module(_EXECUTOR_PLACEMENT)


def layer_ranges(config: ModelConfig, workers: int) -> list[range]:
    """The executor's ranges of layers, one per worker (refused in one line past one layer each)."""
    return _executor().layer_ranges(config.layers, workers)


def describe_ranges(layers: int, workers: int) -> str:
    """The layers placement's ranges in words: "2 layers on each of 16 workers", or "3 layers on
    the first 2 workers, 2 on the other 2"."""
    sizes = [len(r) for r in _executor().layer_ranges(layers, workers)]
    big, small = sizes[0], sizes[-1]
    if big == small:
        return f"{big} layer{'s' if big > 1 else ''} on each of {workers} workers"
    more = sizes.count(big)
    return f"{big} layers on the first {more} workers, {small} on the other {workers - more}"


def place(plan, placement: PlannedPlacement, config: ModelConfig) -> None:
    """Place the tasks of `plan` as the executor would: `sequence` is make_plan's own placement;
    `layers` puts each task on the owner of its layer and orders the plan block by block."""
    if placement == PlannedPlacement.LAYERS:
        ex = _executor()
        ex.place_by_layers(plan, ex.layer_ranges(config.layers, plan.workers))


def worker_weights(config: ModelConfig, placement: PlannedPlacement, workers: int, whole: float,
                   dtype_bytes: int, weight_dtype: str) -> list[float]:
    """Bytes of weights each worker holds: `whole` (the model's, deployment.py weights_bytes) on
    every worker under sequence; under layers the weights the executor's worker of that range loads,
    the feed-forward's at one byte under fp8-ffn."""
    if placement == PlannedPlacement.SEQUENCE:
        return [whole] * workers
    from emulate.models.presets import weight_names

    shapes = weight_names(config)
    ex = _executor()
    out = []
    for own in ex.layer_ranges(config.layers, workers):
        total = 0
        for name in ex.owned_weights(shapes, config.layers, own):
            count = 1
            for n in shapes[name]:
                count *= n
            ffn = weight_dtype == "fp8-ffn" and name.split(".")[-2] + "." in _FFN and name.startswith("layers.")
            total += count * (1 if ffn else dtype_bytes)
        out.append(float(total))
    return out
