"""`emulate cluster up|down|status`: a multi-node Ray cluster on this machine, for trying things.

`up` starts a head and K worker nodes with `ray start`, each a raylet of its own with its own
CPUs, all under one temporary directory; the dashboard and job server listen on 127.0.0.1 and
token authentication is on. `down` stops exactly the processes of that cluster (found by its
directory and address, and their children), never another Ray instance on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from emulate.config import EmulateError

STATE = Path(os.environ.get("EMULATE_CLUSTER_DIR", "/tmp/emulate-cluster"))


def _ray() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _state_file() -> Path:
    return STATE / "cluster.json"


def _load() -> dict | None:
    try:
        return json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None


def _reachable(address: str) -> bool:
    from cluster.session import unreachable

    return unreachable(address, timeout_s=2.0) is None


def _env() -> dict:
    """Token authentication on for every process of the cluster, with a token made if none exists."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader

    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()
    return env


def _start(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise EmulateError(f"`{' '.join(cmd[:3])} ...` failed: {' / '.join(tail)}")


def up(worker_nodes: int, cpus: float | None, port: int, dashboard_port: int) -> dict:
    state = _load()
    if state and _reachable(state["address"]):
        raise EmulateError(f"a cluster is already up at {state['address']} (emulate cluster down first)")
    if worker_nodes < 0:
        raise EmulateError(f"--worker-nodes must be >= 0, got {worker_nodes}")
    cpus = cpus if cpus is not None else float(os.cpu_count() or 1)
    temp = STATE / f"ray-{port}"
    temp.mkdir(parents=True, exist_ok=True)
    env = _env()
    ray = _ray()
    _start([ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus:g}", f"--temp-dir={temp}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats"], env)
    # ray start records the GCS address it advertises (this host's interface address) in its temp dir
    address = (temp / "ray_current_cluster").read_text().strip()
    state = {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}", "temp_dir": str(temp),
             "worker_nodes": worker_nodes, "cpus_per_node": cpus}
    _state_file().write_text(json.dumps(state))
    for _ in range(worker_nodes):
        _start([ray, "start", f"--address={address}", f"--num-cpus={cpus:g}", "--disable-usage-stats"], env)
    return state


def _processes_of(state: dict) -> list[int]:
    """Pids of this cluster's processes and their descendants (workers, job drivers)."""
    import psutil

    def ours(cmd: str) -> bool:
        # Ray's processes name the cluster's directory, or its address as `--flag=ADDRESS`; a
        # driver that joined with `--address ADDRESS` is the user's, not the cluster's.
        return state["temp_dir"] in cmd or (f"={state['address']}" in cmd and "ray" in cmd)

    own: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and ours(cmd):
            own.add(proc.info["pid"])
    for pid in list(own):
        try:
            own.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:  # gone meanwhile
            pass
    return sorted(own)


def down() -> int:
    state = _load()
    if state is None:
        print("no local cluster is up (nothing recorded in " + str(_state_file()) + ")", file=sys.stderr)
        return 0
    pids = _processes_of(state)
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
    _state_file().unlink(missing_ok=True)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    print(f"stopped the local cluster at {state['address']}", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited; only its parent's wait is missing
    except psutil.Error:
        return False


def status() -> dict | None:
    """The recorded state of the local cluster when it is up and reachable, else None."""
    state = _load()
    return state if state is not None and _reachable(state["address"]) else None
