"""`emulate cluster up|down|status`: a multi-node Ray cluster on this machine, for trying things.

`up` starts a head and K worker nodes with `ray start`, each a raylet of its own with its own
CPUs, all under one directory and all on 127.0.0.1: every Ray server of the cluster listens on
the loopback interface only, token authentication is on, and the dashboard and job server listen
on 127.0.0.1 (cluster/README.md, Security, lists every port). It returns once the Jobs API runs a
job (a no-op `true`, submitted, waited for and deleted), within READY_TIMEOUT_S; a failed `up`, at
any step or interrupted, stops everything it started and leaves no state behind. What it starts
is recorded in a directory of this user's own (cluster/state.py), one record per head port, and
`down` stops only the recorded processes that are still the ones recorded, with their
descendants, never another Ray instance on the machine.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from cluster.state import (
    HOST,
    SOCKET_PATH_MAX,
    ClusterRecord,
    forget,
    load,
    own_dir,
    ray_sockets_fit,
    recorded_ports,
    save,
    snapshot,
    state_dir,
    still_ours,
    temp_dir_for,
)
from emulate.errors import EmulateError, error_line

NODE_BYTES = 2**29  # the budget per node: a raylet, its two agents and its idle workers
START_TIMEOUT_S = 180.0  # one `ray start`
READY_TIMEOUT_S = 120.0  # from the last node started until the Jobs API has run a job
# no Prometheus metrics export (an unauthenticated HTTP port per node); the worker nodes take the
# head's system config from its GCS
SYSTEM_CONFIG = {"enable_metrics_collection": False}
# `ray start` for a worker node: Ray refuses worker nodes in its single-machine mode (the one
# that keeps 127.0.0.1 as the node's address), so this passes that check and keeps 127.0.0.1
# as given; the node's processes inherit the mode from the environment (RAY_ENABLE_..._CLUSTER=0).
_RAY_START_ON_LOOPBACK = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def _ray() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe) if exe.exists() else (shutil.which("ray") or "ray")]


def _reachable(address: str) -> bool:
    from cluster.session import unreachable

    return unreachable(address, timeout_s=2.0) is None


def _env() -> dict:
    """The cluster's environment: token authentication on (a token made, mode 0600, if none exists)
    and Ray's single-machine mode, so every node's address is 127.0.0.1."""
    from cluster.session import LOCAL_ONLY_ENV, ensure_token, token_readable_by_others

    made = ensure_token(force=True)
    if made is not None:
        print(f"emulate: made a Ray authentication token in {made} (mode 0600)", file=sys.stderr)
    elif (loose := token_readable_by_others()) is not None:
        print(f"emulate: warning: the Ray token file {loose} is readable by other users; chmod 600 it",
              file=sys.stderr)
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", **{LOCAL_ONLY_ENV: "0"})


def _port_in_use(port: int) -> bool:
    """True when something listens on `port` (any IPv4 address, or all of IPv6)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore connections in TIME_WAIT
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CAUSE = re.compile(r"Error|Exception|Check failed|[Ff]ailed to|refused|already|not found")


def _start(cmd: list[str], env: dict, what: str) -> None:
    """Run one `ray start`; a failure or a hang (START_TIMEOUT_S) is one line. An interrupt kills
    it and goes on up: the caller stops what it had started."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise EmulateError(f"`ray start` for the {what} did not finish within {START_TIMEOUT_S:g} s") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        lines = [_ANSI.sub("", s).strip() for s in out.strip().splitlines() if s.strip()] or ["no output"]
        why = next((s for s in reversed(lines) if _CAUSE.search(s)), lines[-1])
        raise EmulateError(f"`ray start` for the {what} failed (exit {proc.returncode}): {why[:400]}")


def up(worker_nodes: int, cpus: float | None, port: int, dashboard_port: int, announce: bool = True) -> ClusterRecord:
    """Start the cluster and return its record once it runs jobs; on any failure, interrupts
    included, nothing is left. `announce`: one line on stderr before the seconds of `ray start`."""
    if worker_nodes < 0:
        raise EmulateError(f"--worker-nodes must be >= 0, got {worker_nodes}")
    import psutil

    room = int(psutil.virtual_memory().available // NODE_BYTES) - 1  # the head takes one node's share
    if worker_nodes > room:
        raise EmulateError(f"--worker-nodes {worker_nodes}: each node's Ray processes are budgeted at "
                           f"{NODE_BYTES / 2**30:.1f} GiB, and this machine has room for {max(room, 0)} besides the head")
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        raise EmulateError(f"--cpus-per-node must be a finite number > 0, got {cpus}")
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if not 1024 <= p <= 65535:
            raise EmulateError(f"{flag} must be a port in 1024..65535, got {p}")
    if port == dashboard_port:
        raise EmulateError(f"--port and --dashboard-port must differ, both are {port}")
    directory = own_dir(create=True)
    old = load(directory, port)
    if old is not None:
        if _reachable(old.address) or _live(old):
            raise EmulateError(f"a cluster is already up at {old.address} (emulate cluster down --port {port} first)")
        forget(directory, old)  # the record of a cluster that is gone
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if _port_in_use(p):
            raise EmulateError(f"port {p} ({flag}) is already in use on this machine; choose another with {flag}")
    temp = temp_dir_for(directory, port)
    if not ray_sockets_fit(temp):  # an EMULATE_CLUSTER_DIR too long: said before Ray starts, not after
        raise EmulateError(f"the cluster's directory {temp} is too long for Ray's socket paths ({SOCKET_PATH_MAX} "
                           "bytes at most); set EMULATE_CLUSTER_DIR to a shorter directory of your own (mode 0700)")
    cpus = cpus if cpus is not None else float(os.cpu_count() or 1)
    env = _env()
    record = ClusterRecord(port=port, dashboard_port=dashboard_port, client_port=_free_port(), temp_dir=str(temp),
                           worker_nodes=worker_nodes, cpus_per_node=cpus)
    try:
        shutil.rmtree(temp, ignore_errors=True)  # a leftover of a cluster whose record is gone; ours (own_dir)
        temp.mkdir(mode=0o700)
        save(directory, record)  # first: a killed `up` leaves what `down` needs to find the processes
        if announce:
            print(f"emulate: starting a Ray head and {worker_nodes} worker node(s) on {HOST} ...", file=sys.stderr,
                  flush=True)
        node = [f"--num-cpus={cpus:g}", f"--node-ip-address={HOST}", "--dashboard-agent-listen-port=0",
                "--disable-usage-stats"]
        _start([*_ray(), "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=true",
                f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={record.client_port}", f"--system-config={json.dumps(SYSTEM_CONFIG)}", *node],
               env, "head")
        record = _recorded(directory, record)
        for k in range(worker_nodes):
            _start([sys.executable, "-c", _RAY_START_ON_LOOPBACK, "start", f"--address={record.address}", *node],
                   env, f"worker node {k + 1}")
            record = _recorded(directory, record)
        _wait_for_jobs(record.dashboard)
        record = _recorded(directory, record)
    except BaseException as err:
        _stop_started(directory, record)
        if isinstance(err, EmulateError):
            raise EmulateError(f"{err} (stopped everything `cluster up` had started)") from None
        raise
    return record


def _recorded(directory: Path, record: ClusterRecord) -> ClusterRecord:
    """The record with every process of the cluster as it runs now, saved."""
    from dataclasses import replace

    record = replace(record, processes=snapshot(_processes_of(record)))
    save(directory, record)
    return record


def _wait_for_jobs(url: str) -> None:
    """Return once the job server has run a job: a no-op `true` submitted, waited for and deleted.

    Right after `ray start` the dashboard may not answer yet, and the head's job agent may not
    be registered (the job server then answers "No available agent to submit job"); both are
    retried until READY_TIMEOUT_S, then it is one line.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.session import find_token

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {find_token()}"}
    deadline = time.monotonic() + READY_TIMEOUT_S
    client, job, last = None, None, None
    while job is None:
        if time.monotonic() > deadline:
            raise EmulateError(f"the job server at {url} did not accept a job within {READY_TIMEOUT_S:g} s: "
                               f"{error_line(last) if last else 'no answer'}")
        try:
            client = client or JobSubmissionClient(url, headers=headers)
            job = client.submit_job(entrypoint="true", submission_id=f"emulate-ready-{uuid.uuid4().hex[:8]}",
                                    metadata={"emulate": "cluster up readiness check"})
        except Exception as err:  # noqa: BLE001 - not up yet, or no agent yet: both pass
            last = err
            time.sleep(1.0)
    status = None
    try:
        while time.monotonic() < deadline:
            status = client.get_job_status(job)
            if status.is_terminal():
                break
            time.sleep(0.5)
        else:
            raise EmulateError(f"a no-op test job did not finish within {READY_TIMEOUT_S:g} s (still {status})")
        if status != JobStatus.SUCCEEDED:
            info = client.get_job_info(job)
            raise EmulateError(f"a no-op test job {status.value.lower()}: {error_line(info.message or 'no message')}")
    except EmulateError:
        raise
    except Exception as err:  # noqa: BLE001 - the job server went away meanwhile
        raise EmulateError(f"the job server at {url} stopped answering: {error_line(err)}") from None
    try:
        client.delete_job(job)
    except Exception:  # noqa: BLE001 - a leftover finished record is harmless
        pass


def _processes_of(record: ClusterRecord) -> list[int]:
    """Pids of this user's processes that name the cluster's directory, or its address as
    `--flag=ADDRESS` in a Ray program, and their descendants (workers, job drivers). Used by `up`
    alone, on the directory it has just made: `down` trusts only the processes recorded."""
    import psutil

    temp, address = record.temp_dir, record.address

    def ours(args: list[str]) -> bool:
        # Ray's processes name the cluster's directory, or its address as `--flag=ADDRESS`; a
        # driver that joined with `--address ADDRESS` is the user's, not the cluster's.
        if any(a == temp or a.endswith("=" + temp) or temp + "/" in a for a in args):
            return True
        joined = " ".join(args)
        ray_program = ("site-packages/ray/" in joined or "ray.util.client" in joined or "ray.scripts" in joined
                       or any(Path(a).name == "ray" for a in args[:2]))
        return ray_program and any(a.endswith("=" + address) for a in args)

    own: set[int] = set()
    skip = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        args = proc.info["cmdline"] or []
        uids = proc.info["uids"]
        if args and proc.info["pid"] not in skip and uids is not None and uids.real == os.getuid() and ours(args):
            own.add(proc.info["pid"])
    return sorted(_with_descendants(own) - skip)


def _with_descendants(pids) -> set[int]:
    import psutil

    out = set(pids)
    for pid in list(out):
        try:
            out.update(child.pid for child in psutil.Process(pid).children(recursive=True)
                       if child.uids().real == os.getuid())
        except psutil.Error:  # gone meanwhile
            pass
    return out


def _live(record: ClusterRecord) -> list[int]:
    """The recorded processes that are still the ones recorded, with their descendants."""
    return sorted(_with_descendants(p.pid for p in record.processes if still_ours(p) is not None) - {os.getpid()})


def _kill(find) -> None:
    """Stop what `find()` names (SIGTERM, then SIGKILL after 5 s); a raylet may start a worker while
    the others stop, so it is asked again."""
    for _ in range(3):
        pids = find()
        if not pids:
            break
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            end = time.monotonic() + wait_s
            while time.monotonic() < end and any(_alive(p) for p in pids):
                time.sleep(0.2)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break


def _stop_started(directory: Path, record: ClusterRecord) -> None:
    """A failed `up`: stop what it started (found by the directory it made a moment ago and by its
    records) and forget it."""
    recorded = set(_live(record))
    _kill(lambda: sorted(set(_processes_of(record)) | {p for p in recorded if _alive(p)}))
    forget(directory, record)


def _select(directory: Path | None, port: int | None) -> ClusterRecord | None:
    """The record `--port` names; without it, the only one (several are one line asking for --port)."""
    if directory is None:
        return None
    if port is not None:
        return load(directory, port)
    ports = recorded_ports(directory)
    if len(ports) > 1:
        raise EmulateError(f"several local clusters are recorded (ports {', '.join(map(str, ports))}); "
                           "name one with --port")
    return load(directory, ports[0]) if ports else None


def down(port: int | None = None) -> int:
    directory = own_dir(create=False)
    record = _select(directory, port)
    if record is None:
        where = f"for port {port} " if port is not None else ""
        print(f"no local cluster is up (nothing recorded {where}in {directory or state_dir()})", file=sys.stderr)
        return 0
    _kill(lambda: _live(record))
    forget(directory, record)
    print(f"stopped the local cluster at {record.address}", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited; only its parent's wait is missing
    except psutil.Error:
        return False


def status(port: int | None = None) -> ClusterRecord | None:
    """The record of the local cluster (the one at `port`) when it is up and reachable, else None."""
    record = _select(own_dir(create=False), port)
    return record if record is not None and _reachable(record.address) else None


def job_server() -> str | None:
    """The dashboard URL of the one local cluster recorded (for `emulate submit`), else None;
    several are one line asking for --address."""
    directory = own_dir(create=False)
    if directory is None:
        return None
    ports = recorded_ports(directory)
    if len(ports) > 1:
        raise EmulateError(f"several local clusters are recorded (ports {', '.join(map(str, ports))}); "
                           "name the job server with --address http://127.0.0.1:DASHBOARD_PORT")
    record = load(directory, ports[0]) if ports else None
    return record.dashboard if record is not None else None
