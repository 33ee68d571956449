"""--placement auto: the placement the planner predicts fastest among those that fit.

The planner (emulate/planner/prediction.py `predict_placements`) prices sequence, layers and grid
for this run's model, tokens, block size, masks, P and device, each through the executor's own
layout (cluster/placement.py `layout_of`). A placement fits when its most loaded worker's need
(cluster/placement.py `worker_need`, what --worker-memory refuses) is within --worker-memory, and
the planner's peak per worker within the device's memory (its `fits`). Of those, the fastest
predicted wins; a tie goes to the first of sequence, layers, grid (a one-row or one-column grid is
laid out exactly as sequence or layers). The choice and every predicted time go on stderr in one line.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.placement import Grid, Placement, fitting, layout_of
from emulate.errors import EmulateError


@dataclass(frozen=True)
class Choice:
    placement: Placement
    grid: Grid | None  # the grid placement's shape
    line: str  # the choice in words, with each placement's predicted time
    figures: dict  # the choice and the planner's figures it was made from, for the run's stats


def planner_device(job, opts) -> str:
    """The planner's name for the run's device: this machine's CPU (measured once and cached,
    emulate/planner/calibrate.py), or the GPU of the datasheet table the driver's first GPU names."""
    if job.device != "cuda":
        return "cpu"
    import torch

    from emulate.planner.costs import DEVICES

    name = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
    for key in DEVICES:
        if key in name:
            return key
    raise EmulateError(f"--placement auto: the planner has no figures for the GPU {name or '(none visible)'!r} "
                       f"(it knows {', '.join(DEVICES)}); choose --placement sequence, layers or grid")


def choose(job, opts, workers: int, shapes: dict) -> Choice:
    """The placement for `job` on P workers (opts: cluster.options.Ray): see the module docstring."""
    from emulate.planner.prediction import predict_placements

    config, spec = job.model.config, job.compact.spec
    outcomes = predict_placements(job.model, len(job.tokens), placement="all", block_size=spec.block_size,
                                  attention=list(spec.patterns), workers=workers, device=planner_device(job, opts),
                                  gpus_per_worker=max(1, round(opts.gpus_per_worker)),
                                  grid=None if opts.grid is None else str(opts.grid))
    room = {need.placement: need for need in fitting(config, shapes, len(job.tokens), workers, job.dtype.itemsize,
                                                     opts.worker_memory, opts.grid)}
    rows, candidates = [], []
    for o in outcomes:
        placement = Placement(o.placement)
        name = o.placement
        if placement == Placement.GRID:
            name = f"grid {layout_of(placement, workers, config.layers, opts.grid).grid}" if o.prediction else "grid"
        if o.prediction is None:
            rows.append(f"{name} cannot be laid out")
            continue
        why = None
        if placement not in room:
            why = f"over --worker-memory {opts.worker_memory}"
        elif not o.prediction.fits:
            why = f"over the planner's memory per worker ({o.prediction.peak_worker_memory_gb:.3g} GB)"
        rows.append(f"{name} {o.prediction.predicted_s:.3g} s" + (f" ({why})" if why else ""))
        if why is None:
            candidates.append((o.prediction.predicted_s, len(candidates), placement, name, o.prediction))
    if not candidates:
        raise EmulateError(f"--placement auto: no placement fits on {workers} workers: {'; '.join(rows)}")
    _, _, placement, name, prediction = min(candidates)
    grid = layout_of(placement, workers, config.layers, opts.grid).grid if placement == Placement.GRID else None
    line = f"--placement auto chose {name} on {workers} workers, predicted fastest that fits: {'; '.join(rows)}"
    figures = {"chosen": name, "predicted_s": {o.placement: o.prediction.predicted_s for o in outcomes if o.prediction},
               "fits": sorted(str(p) for p in room), "device": prediction.inputs["device"]}
    return Choice(placement, grid, line, figures)
