"""Waiting on Ray for the executor and the decode store: its failures turned into one line, or into
Lost where a dead worker or node took a value with it (the caller makes it again), and the health
checks that stop a run no worker can move on.
"""
from __future__ import annotations

import time

from cluster.session import WorkerPool, capacity
from cluster.worker import LostLocal
from emulate.errors import EmulateError, error_line

HEALTH_EVERY_S = 5.0
RESTART_GRACE_S = 60.0  # a worker not back by then has no node that can host it
NO_ROOM_GRACE_S = 15.0  # ... sooner when no live node has room for one (an autoscaler may still add some)


class Lost(Exception):
    """A task or a value that a worker or node took with it when it died: the driver runs the
    lost work again (cluster/executor.py, `_Dispatch.recover`) rather than failing."""


def get(ray, ref, what: str, pool: WorkerPool | None = None, task=None, timeout: float | None = None):
    """ray.get with Ray's failures turned into one line that says what could not be done, or into
    Lost when what failed was a value a dead worker or node took with it."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if getattr(err, "cause", None) is not None else err
        if isinstance(cause, (LostLocal, ray.exceptions.ObjectLostError)):  # a dead worker's values: re-run them
            raise Lost(error_line(cause, last=True)) from None
        raise EmulateError(f"{what} failed on worker {task.worker if task else '?'}: "
                           f"{type(cause).__name__}: {error_line(cause, last=True)}") from None
    except ray.exceptions.RayActorError as err:
        worker = f"worker {task.worker}" if task else "a worker"
        raise EmulateError(f"{what} could not run: {worker} died and could not be restarted "
                           f"({pool.opts.max_restarts if pool else '?'} restarts allowed): {error_line(err, last=True)}") from None
    except ray.exceptions.ObjectLostError as err:  # gone with its node and not rebuilt by Ray: re-run its producers
        raise Lost(f"{what}: {error_line(err, last=True)}") from None
    except ray.exceptions.RayError as err:
        raise EmulateError(f"{what}: {type(err).__name__}: {error_line(err, last=True)}") from None


def fetch(ray, ref, what: str, pool: WorkerPool, opts):
    """ray.get of a value that may need rebuilding (its node died): wait, but never past the health checks."""
    since = time.monotonic()
    while True:
        try:
            return get(ray, ref, what, pool, timeout=HEALTH_EVERY_S)
        except ray.exceptions.GetTimeoutError:
            check_health(pool, opts, time.monotonic() - since)


def check_health(pool: WorkerPool, opts, idle_s: float) -> None:
    """Fail, rather than wait forever, when no worker can make progress."""
    states = pool.states()
    if all(s == "DEAD" for s in states):
        raise EmulateError(f"all {pool.size} workers are dead; nothing can run the remaining tasks")
    fit, nodes = capacity(opts.cpus_per_worker, opts.gpus_per_worker)
    down = [k for k, s in enumerate(states) if s != "ALIVE"]
    if down and (idle_s >= RESTART_GRACE_S or (fit == 0 and idle_s >= NO_ROOM_GRACE_S)):
        raise EmulateError(f"worker(s) {down} not running for {idle_s:.0f} s ({', '.join(states[k] for k in down)}); "
                           f"the cluster has room for {fit} worker(s) now ({nodes})")
    if idle_s >= opts.stall_timeout:
        raise EmulateError(f"no task finished in {idle_s:.0f} s (--stall-timeout); worker states {states}; {nodes}")
