"""Joining or starting Ray, and the pool of worker actors: every bad request ends in one clear line.

Without an address the executor starts a private local Ray instance (no dashboard, no job
server) and stops it at the end (on success when the process exits: its shutdown takes seconds
that are no part of the forward); with `--address auto|HOST:PORT` or RAY_ADDRESS it joins a
running cluster and leaves it running. Token authentication stays as Ray sets it: on for a new
local instance, and a joined cluster that wants a token refuses a driver without one.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
import uuid

from emulate.config import EmulateError, error_line
from emulate.executor import Ray

NAMESPACE = "emulate"


def connect(address: str | None) -> bool:
    """Connect this process to Ray; True when it started a private instance it must stop."""
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False, namespace=NAMESPACE)
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
        except Exception as err:  # noqa: BLE001 - Ray raises many kinds here; the user needs one line
            raise EmulateError(f"could not start a local Ray instance: {error_line(err)}") from None
        return True
    if address.startswith(("http://", "https://")):
        raise EmulateError(f"--address {address} is a dashboard/job server address; `emulate run` joins a cluster "
                           "with --address auto or HOST:PORT (the GCS port, 6379 by default); `emulate submit` takes the http one")
    if address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)
    has_token = _use_token_if_present()
    try:
        ray.init(address=address, **quiet)
    except Exception as err:  # noqa: BLE001
        hint = "" if has_token else (" (no Ray authentication token found in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
                                     "~/.ray/auth_token; a cluster with token authentication refuses drivers without one)")
        raise EmulateError(f"could not join the Ray cluster at {address}: {error_line(err)}{hint}") from None
    return False


def _use_token_if_present() -> bool:
    """Send Ray's token when one exists (as `ray start` does); an explicit RAY_AUTH_MODE wins."""
    from ray._raylet import AuthenticationTokenLoader, Config

    has_token = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: refresh it so this process sees token mode
    return has_token


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why HOST:PORT takes no TCP connection now, or None when it does."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return str(err.strerror or err)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EmulateError(f"--address must be auto or HOST:PORT, got {address!r}")
    why = unreachable(address, timeout_s)
    if why is not None:
        raise EmulateError(f"no Ray cluster reachable at {address}: {why}")


def disconnect(owned: bool) -> None:
    import ray

    if owned and ray.is_initialized():
        ray.shutdown()


def capacity(cpus: float, gpus: float) -> tuple[int, str]:
    """How many workers of (cpus, gpus) fit the cluster's live nodes, and the nodes in words."""
    import ray

    fit, parts = 0, []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        r = node.get("Resources", {})
        c, g = r.get("CPU", 0.0), r.get("GPU", 0.0)
        n = math.floor(c / cpus + 1e-9)
        if gpus > 0:
            n = min(n, math.floor(g / gpus + 1e-9))
        fit += n
        parts.append(f"{c:g} CPU" + (f", {g:g} GPU" if g else ""))
    nodes = f"{len(parts)} node(s): " + "; ".join(parts) if parts else "no live nodes"
    return fit, nodes


def _available() -> str:
    import ray

    a = ray.available_resources()
    return f"{a.get('CPU', 0):g} CPU, {a.get('GPU', 0):g} GPU free now"


class WorkerPool:
    """K worker actors, each holding the model once; restartable, tasks retried after a restart."""

    def __init__(self, opts: Ray, device: str, config, weights: dict, tokens, graph_meta: dict, dtype: str):
        import ray

        from cluster.worker import Worker

        self.opts = opts
        fit, nodes = capacity(opts.cpus_per_worker, opts.gpus_per_worker)
        want = opts.workers if opts.workers is not None else max(1, fit)
        shape = f"{opts.cpus_per_worker:g} CPU" + (f" + {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else "")
        if fit < want:
            raise EmulateError(f"asked for {want} worker(s) of {shape} each, but the cluster has room for {fit} "
                               f"({nodes})")
        self.size = want
        self.run_id = uuid.uuid4().hex[:8]
        # Put once; every worker (and every restart) reads these copies. They travel wrapped in a
        # list, so the actor fetches them itself, and the pool holds the refs for the whole run.
        self.shared = [ray.put(weights), ray.put(tokens)]
        actor = ray.remote(Worker)
        placement = dict(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker, max_restarts=opts.max_restarts,
                         max_task_retries=opts.max_restarts, allow_out_of_order_execution=True,
                         scheduling_strategy="SPREAD", namespace=NAMESPACE)
        self.names = [f"emulate-{self.run_id}-worker-{k}" for k in range(want)]
        self.actors = [actor.options(name=name, **placement).remote(k, config, graph_meta, dtype,
                                                        device, opts.threads)
                       for k, name in enumerate(self.names)]
        self.info = self._wait_ready(shape, nodes)

    def _wait_ready(self, shape: str, nodes: str) -> list[dict]:
        import ray

        pings = [a.ping.remote(self.shared) for a in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=self.opts.start_timeout)
        if len(ready) < len(pings):
            self.close()
            raise EmulateError(f"only {len(ready)} of {len(pings)} worker(s) of {shape} started within "
                               f"{self.opts.start_timeout:g} s ({nodes}; {_available()})")
        try:
            return ray.get(pings)
        except ray.exceptions.RayError as err:
            self.close()
            raise EmulateError(f"a worker failed to start: {error_line(err)}") from None

    def states(self) -> list[str]:
        """Each actor's state from the GCS: ALIVE, RESTARTING, PENDING_CREATION or DEAD.

        Read from the GCS client: Ray's public state API (ray.util.state) asks the dashboard's
        state server, and a private instance runs without a dashboard.
        """
        from ray._private import state

        out = []
        for a in self.actors:
            info = state.actors(a._actor_id.hex())
            out.append(info.get("State", "DEAD") if info else "DEAD")
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
