"""The placements the planner prices, as the Ray executor places them (cluster/placement.py):

    sequence  every worker holds the whole model and runs every layer for its run of query blocks
              (graphs/plan.py `place`): context parallelism
    layers    each worker owns a contiguous range of layers and holds only their weights (the
              embedding on the first, the final norm and head on the last, and where a range ends
              the next layer's pre-norm and q, k, v projections, which ride with its last mix);
              every task of a layer runs on its owner, in the executor's pipeline order
    grid      P_layers x P_sequence workers: a row per range of layers holding only its weights, the
              row's workers splitting its query blocks as sequence splits them over all, rows in the
              layers pipeline (`--grid 2x2`; default the executor's `default_grid`)

`placed_plan` makes a counted plan (graphs/plan.py, runnable=False) and places it with the executor's
own layout (cluster/placement.py `layout_of`: `plan_workers`, `place`), so the simulation (emulate/planner/simulation.py) runs the plan the executor would;
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
    GRID = "grid"


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


def layout(config: ModelConfig, placement: PlannedPlacement, workers: int, grid=None):
    """The executor's layout (cluster/placement.py `Layout`) of `placement` on P workers; `grid`
    ("2x2" or None for the executor's default) for the grid placement only. Refused in one line
    where it cannot be laid out."""
    ex = _executor()
    return ex.layout_of(ex.Placement(placement.value), workers, config.layers,
                        grid if placement == PlannedPlacement.GRID else None)


def describe_layout(layers: int, workers: int, placement: str = "layers", grid: str | None = None) -> str:
    """A layers or grid placement in words."""
    if placement != PlannedPlacement.GRID:
        return describe_ranges(layers, workers)
    g = _executor().grid_of(grid, workers, layers)
    return (f"{g}, {g.layers} row(s) of {g.sequence} worker(s): "
            f"{describe_ranges(layers, g.layers).replace('workers', 'rows')}, each row's blocks over its {g.sequence}")


def placed_plan(graph, placement: PlannedPlacement, config: ModelConfig, workers: int, grid=None):
    """The counted plan of `graph` placed as the executor places it: made by make_plan for the
    layout's `plan_workers` (a grid's row; P otherwise), then put on the layout's P workers."""
    from graphs.plan import make_plan

    lay = layout(config, placement, workers, grid)
    plan = make_plan(graph, lay.plan_workers, runnable=False)
    lay.place(plan)
    return plan


def worker_weights(config: ModelConfig, placement: PlannedPlacement, workers: int, whole: float,
                   dtype_bytes: int, weight_dtype: str, grid=None) -> list[float]:
    """Bytes of weights each worker holds: `whole` (the model's, deployment.py weights_bytes) on
    every worker under sequence; under layers and grid the weights the executor's worker of that
    range loads, the feed-forward's at one byte under fp8-ffn."""
    from emulate.models.presets import weight_names

    shapes = weight_names(config)
    owned = layout(config, placement, workers, grid).owned(shapes)
    if owned is None:
        return [whole] * workers
    out = []
    for names in owned:
        total = 0
        for name in names:
            count = 1
            for n in shapes[name]:
                count *= n
            ffn = weight_dtype == "fp8-ffn" and name.split(".")[-2] + "." in _FFN and name.startswith("layers.")
            total += count * (1 if ffn else dtype_bytes)
        out.append(float(total))
    return out
