"""Joining or starting Ray, and the pool of worker actors: every bad request ends in one clear line.

Without an address the executor starts a private local Ray instance and stops it at the end (on
success when the process exits: its shutdown takes seconds that are no part of the forward). The
private instance is one node on 127.0.0.1: every server it starts listens on the loopback
interface only (cluster/README.md, Security, lists them), with no dashboard, no metrics export,
and Ray's token authentication on (a token is made in ~/.ray/auth_token, mode 0600, if none
exists). With `--address auto|HOST:PORT` or RAY_ADDRESS it joins a running cluster and leaves it
running: the cluster's GCS is asked first (one RPC, a few milliseconds) whether it takes this
process's token, so a cluster that wants a token refuses a driver without one in one line and at
once, rather than after Ray's twenty seconds of retries.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import stat
import sys
import tempfile
import time
import uuid
from pathlib import Path

from emulate.errors import EmulateError, error_line

NAMESPACE = "emulate"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Ray's single-machine mode (its default on macOS and Windows): with it, Ray keeps 127.0.0.1 as
# the node's address instead of resolving it to the host's interface address, and every Ray
# server then binds the loopback interface only.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PROBE_TIMEOUT_S = 5.0


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
            ensure_token()
            with loopback_only():
                # Ray's workers keep its default niceness (15): when they fill every core, the raylet
                # and the driver still get one at once for each put and dispatch (at niceness 0 a
                # forward on 2 workers and 2 cores ran about 3% slower)
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         _system_config={"enable_metrics_collection": False}, **quiet)
        except EmulateError as err:
            raise EmulateError(f"could not start a local Ray instance: {err}") from None
        except Exception as err:  # noqa: BLE001 - Ray raises many kinds here; the user needs one line
            raise EmulateError(f"could not start a local Ray instance: {error_line(err)}") from None
        return True
    if address.startswith(("http://", "https://")):
        raise EmulateError(f"--address {address} is a dashboard/job server address; `emulate run` joins a cluster "
                           "with --address auto or HOST:PORT (the GCS port, 6379 by default); `emulate submit` takes the http one")
    target = _resolve_auto(address)
    if target is not None and address != "auto":
        _check_reachable(target)
    token, why_none = _token_for_join()
    nodes = _probe(target, token, why_none) if target is not None else None
    # a cluster whose nodes all live on 127.0.0.1 (`emulate cluster up`) is joined the same way
    loopback = bool(nodes) and all(n in LOOPBACK for n in nodes)
    try:
        with loopback_only(loopback), _stderr_captured() as captured:
            ray.init(address=address, **quiet)
    except Exception as err:  # noqa: BLE001
        hint = "" if token else f" ({why_none}; a cluster with token authentication refuses drivers without one)"
        raise EmulateError(f"could not join the Ray cluster at {address}: {error_line(err)}{hint}") from None
    sys.stderr.write(captured())  # what Ray wrote on the way in, shown once it joined
    return False


def token_path() -> Path:
    """Where Ray reads its token file: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def find_token() -> str | None:
    """The token Ray would send ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), or None.
    A $RAY_AUTH_TOKEN_PATH naming no readable, non-empty file is an error (Ray's own rule)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the token file may have appeared since this process started
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError:
        raise EmulateError(f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} names no readable, "
                           "non-empty token file") from None


def ensure_token(force: bool = False) -> Path | None:
    """Make sure a token exists for a new local instance or cluster with token authentication.

    Ray would make one itself, readable by everyone (mode 0644); this makes it first in
    ~/.ray/auth_token with mode 0600 (and ~/.ray with mode 0700 when it creates it). Returns the
    path it wrote, or None when a token existed already or authentication is off by choice
    (RAY_AUTH_MODE=disabled, unless `force`: `emulate cluster up` always uses a token).
    """
    if not force and os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    if find_token() is not None:
        return None
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = Path.home() / ".ray" / "auth_token"
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing empty file keeps its old mode otherwise
        f.write(generate_new_authentication_token())
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()
    return path


def token_readable_by_others() -> str | None:
    """The token file and its mode when users other than its owner may read it, else None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    try:
        mode = token_path().stat().st_mode
    except OSError:
        return None
    return f"{token_path()} (mode {stat.S_IMODE(mode):04o})" if mode & 0o077 else None


@contextlib.contextmanager
def loopback_only(on: bool = True):
    """Ray's single-machine mode while Ray starts or joins inside: node address 127.0.0.1.

    Ray resolves 127.0.0.1 to the host's interface address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is 0; the variable reaches the processes Ray starts meanwhile (they inherit it), and Ray's
    constant in this process follows it for the duration. Both are restored after.
    """
    if not on:
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 into a temporary file while inside: Ray's C++ core writes its retry
    warnings there directly, not through Python. Yields a function that returns what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    tmp = tempfile.TemporaryFile()
    text: list[str] = []
    try:
        os.dup2(tmp.fileno(), 2)
        yield lambda: "".join(text)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        text.append(tmp.read().decode(errors="replace"))
        tmp.close()


def _resolve_auto(address: str) -> str | None:
    """HOST:PORT for --address auto (from $RAY_ADDRESS or the latest local cluster), or the address;
    None for a Ray Client address or an auto that names nothing (Ray then says why)."""
    if address.startswith("ray://"):
        return None
    if address != "auto":
        return address
    try:
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
    except Exception:  # noqa: BLE001 - Ray reports it itself in ray.init
        return None
    return found if found and found not in ("auto", "local") and not found.startswith("ray://") else None


def _token_for_join() -> tuple[str | None, str]:
    """(the token to send, or None; why there is none, for the error line)."""
    explicit = os.environ.get("RAY_AUTH_MODE")
    try:
        token = find_token()
    except EmulateError as err:
        return None, str(err)
    if token is None:
        return None, "no Ray authentication token found in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
    if explicit is not None and explicit.lower() != "token":
        return None, f"RAY_AUTH_MODE={explicit}, so no token is sent"
    if explicit is None:  # send Ray's token when one exists (as `ray start` does)
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches its config: refresh it so this process sees token mode
    return token, ""


def _probe(address: str, token: str | None, why_none: str) -> list[str] | None:
    """Ask the GCS at HOST:PORT for its live nodes with this process's token, in one RPC.

    Returns their addresses; a refused token, or none for a cluster that wants one, is one line
    (EmulateError) at once, and so is a port where no gRPC server answers. None when the probe
    cannot tell (TLS, a slow or older GCS): ray.init decides.
    """
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return None
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=PROBE_TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if token:
                raise EmulateError(f"the Ray cluster at {address} refused this process's authentication token "
                                   f"(from {'$RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else token_path()}); "
                                   "use the cluster's token (`ray get-auth-token` on its head prints it)") from None
            raise EmulateError(f"the Ray cluster at {address} requires token authentication: {why_none}; copy the "
                               "cluster's token to ~/.ray/auth_token or set RAY_AUTH_TOKEN") from None
        if code == grpc.StatusCode.UNAVAILABLE:
            raise EmulateError(f"no Ray cluster answers at {address}: {error_line(err.details() or code.name)}") from None
        return None
    return [n.node_manager_address for n in reply.node_info_list if n.state == 0]  # 0: ALIVE


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


def disconnect(owned: bool, linger_s: float = 0.0) -> None:
    """Leave Ray; a private instance is stopped with every process it started.

    ray.shutdown stops the processes the driver started itself (GCS, raylet, monitors); those a
    raylet was still starting when it was stopped (its agents, under load) can outlive it. Ray
    names the instance's session directory session_<date>_<time>_<driver pid> and every process of
    the instance carries that path on its command line, so what carries it afterwards is stopped
    too; no other process is touched.
    """
    import ray

    mark = f"_{os.getpid()}/"
    ours = _instance_processes(mark) if owned else []
    if owned and ray.is_initialized():
        ray.shutdown()
    if owned:
        _stop_leftovers(mark, ours, linger_s=linger_s)


def _instance_processes(mark: str) -> list:
    """This process's descendants that belong to its Ray instance, found while the tree is whole:
    Ray renames its agents' command lines (ray::DashboardAgent), dropping the session path."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if any(mark in a or a.startswith("ray::") for a in cmd):
            found.append(proc)
    return found


def _stop_leftovers(mark: str, known: list, linger_s: float = 0.0, settle_s: float = 15.0) -> None:
    """Kill what is left of the instance (`known`, and whatever carries its session path), its
    raylets and GCS first: a raylet that outlives its agents starts them again."""
    import psutil

    def left():
        found = [p for p in known if _running(p)]
        seen = {p.pid for p in found}
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            if proc.info["pid"] in seen or proc.info["pid"] == os.getpid():
                continue
            if any("session_" in a and mark in a for a in proc.info["cmdline"] or []):
                found.append(proc)
        # the processes that start others go first
        return sorted(found, key=lambda p: 0 if any(k in _name(p) for k in ("raylet", "gcs_server")) else 1)

    deadline = time.monotonic() + settle_s
    quiet_since = None
    while True:
        procs = left()
        if not procs:
            # a raylet stopped while it started its agents leaves them to come up a moment later
            now = time.monotonic()
            quiet_since = now if quiet_since is None else quiet_since
            if now - quiet_since >= linger_s or now > deadline:
                return
            time.sleep(0.2)
            continue
        quiet_since = None
        for proc in procs:
            try:
                proc.kill()  # ray.shutdown had its graceful turn
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=2)
        if time.monotonic() > deadline:
            return


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - gone meanwhile
        return ""


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


def pool_size(opts) -> int:
    """The workers a run gets: --workers, or as many as the cluster fits; refused when it fits fewer."""
    fit, nodes = capacity(opts.cpus_per_worker, opts.gpus_per_worker)
    want = opts.workers if opts.workers is not None else max(1, fit)
    shape = f"{opts.cpus_per_worker:g} CPU" + (f" + {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else "")
    if fit < want:
        raise EmulateError(f"asked for {want} worker(s) of {shape} each, but the cluster has room for {fit} ({nodes})")
    return want


class WorkerPool:
    """K worker actors, each holding the model once; restartable, tasks retried after a restart."""

    def __init__(self, opts, device: str, config, weights: dict, tokens, graph_meta: dict, dtype: str, oracle,
                 size: int | None = None, owned: list[list[str]] | None = None, keep_kv: bool = False):
        """opts: the run's cluster.options.Ray (its workers, their CPUs, GPUs and threads, restarts, start
        timeout); oracle: the run's oracle description, bound in each worker. size: the workers, when
        the caller counted them (`pool_size`). owned: the weight names each worker loads (the layers
        and grid placements, cluster/placement.py); None: every worker loads them all. keep_kv: each worker
        keeps the keys and values of the projections it runs (generation, cluster/decode.py)."""
        import ray

        from cluster.worker import Worker

        self.opts = opts
        want = pool_size(opts) if size is None else size
        _, nodes = capacity(opts.cpus_per_worker, opts.gpus_per_worker)
        shape = f"{opts.cpus_per_worker:g} CPU" + (f" + {opts.gpus_per_worker:g} GPU" if opts.gpus_per_worker else "")
        self.size = want
        self.run_id = uuid.uuid4().hex[:8]
        # Put once; every worker (and every restart) reads these copies. They travel wrapped in a
        # list, so the actor fetches them itself, and the pool holds the refs for the whole run.
        # Weights travel as WireTensors: a worker reads them as views of the object store's memory
        # (cluster/worker.py, from_wire), never unpickled into a second copy of its own.
        from cluster.worker import to_wire

        if owned is None:
            self.shared = [ray.put(to_wire(weights)), ray.put(tokens)]
        else:  # each worker's own weights, put once per range (a grid's row shares one copy): no worker's
            # process ever holds another range's
            put: dict[tuple, object] = {}
            for names in owned:
                if tuple(names) not in put:
                    put[tuple(names)] = ray.put(to_wire({n: weights[n] for n in names}))
            self.shared = [[put[tuple(names)] for names in owned], ray.put(tokens)]
        actor = ray.remote(Worker)
        # Several workers run their tasks out of order, as inputs arrive (the wavefront); a lone
        # worker has nothing to wait for but itself, and runs them in plan order (a topological
        # order), so its calls need no ordering arguments and follow each other without a round
        # trip to the driver.
        self.in_order = want == 1
        placement = dict(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker, max_restarts=opts.max_restarts,
                         max_task_retries=opts.max_restarts, allow_out_of_order_execution=not self.in_order,
                         scheduling_strategy="SPREAD", namespace=NAMESPACE)
        self.names = [f"emulate-{self.run_id}-worker-{k}" for k in range(want)]
        self.actors = [actor.options(name=name, **placement).remote(k, config, graph_meta, dtype,
                                                        device, opts.threads, oracle, keep_kv)
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

    def holdings(self, generation: int, on_wait, every_s: float = 5.0) -> list[set]:
        """Start the driver's submission `generation` on every worker and return the keys of the
        values each holds now (a restarted worker holds none, once it has loaded the weights
        again); `on_wait(seconds)` runs every `every_s` while some have not answered (a health
        check that raises to give up)."""
        import ray

        asks = [a.holdings.remote(generation, self.shared) for a in self.actors]
        since = time.monotonic()
        while True:
            ready, _ = ray.wait(asks, num_returns=len(asks), timeout=every_s)
            if len(ready) == len(asks):
                break
            on_wait(time.monotonic() - since)
        try:
            return [set(held) for held in ray.get(asks)]
        except ray.exceptions.RayError as err:
            raise EmulateError(f"a worker could not be reached to recover lost values: {error_line(err)}") from None

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
