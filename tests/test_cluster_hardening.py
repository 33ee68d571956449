"""Ray cluster commands and the security story: failed `cluster up`, joining without a token,
the token file's mode, `cluster up && submit` on busy CPUs, and the ports of cluster/README.md.

Every test cluster lives in its own EMULATE_CLUSTER_DIR, on free non-default ports, with a
temporary HOME (its own token), and is always stopped in a `finally`: a user's cluster and
~/.ray/auth_token are never touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATE = [sys.executable, "-m", "emulate.cli"]
README = ROOT / "cluster" / "README.md"
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, cluster_dir: Path | None = None, **extra) -> dict:
    """This environment without any Ray address or token, with its own HOME (and cluster directory)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", LOCAL_ONLY) and not k.startswith("RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    if cluster_dir is not None:
        env["EMULATE_CLUSTER_DIR"] = str(cluster_dir)
    return env


LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.fixture
def short_tmp():
    """A short directory under /tmp: Ray's socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="emh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_named(text: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(text in a for a in (p.info["cmdline"] or [])) and p.info["pid"] != os.getpid():
            out.append(p.info["pid"])
    return out


def one_error_line(stderr: str) -> str:
    lines = [s for s in stderr.strip().splitlines() if s.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("emulate: error:"), stderr
    return lines[0]


# -- the README's port tables ----------------------------------------------------------------------

def readme_table(title: str) -> list[dict]:
    """The rows of the port table after the paragraph that starts with `title` in cluster/README.md."""
    text = README.read_text()
    section = text[text.index("## Security"):]
    after = section[section.index(title):]
    rows = []
    for line in after.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| process"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(dict(zip(("process", "listens", "what", "protected"), cells)))
    assert rows, f"no table after {title!r} in {README}"
    return rows


def fixed_port(r: dict, flags: dict) -> int | None:
    """The port a row names (a number, or a `--flag` of `cluster up` given in `flags`), else None."""
    where = r["listens"].split(" (")[0]
    for flag, port in flags.items():
        if f"`{flag}`" in where:
            return port
    m = re.search(r":(\d{4,5})\b(?!-)", where)
    return int(m.group(1)) if m else None


def row(rows: list[dict], starts: str, port: int, flags: dict) -> dict:
    """The table row for a process (its `process` cell starts with `starts`) listening on `port`:
    the row naming that port, else the one naming none."""
    found = [r for r in rows if r["process"].startswith(starts)]
    assert found, f"cluster/README.md's table has no row for {starts} (port {port})"
    named = [r for r in found if fixed_port(r, flags) == port]
    unnamed = [r for r in found if fixed_port(r, flags) is None]
    assert named or unnamed, f"{starts} listens on {port}, which its rows in cluster/README.md do not name: {found}"
    return (named or unnamed)[0]


def refused_without_token(host: str, port: int) -> str:
    """What a request without a token gets: 'http 401', 'grpc UNAUTHENTICATED', or what else it got."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/version", timeout=3) as r:
            return f"http {r.status}"
    except urllib.error.HTTPError as err:
        return f"http {err.code}"
    except Exception:  # noqa: BLE001 - not HTTP/1.1: a gRPC server
        pass
    import grpc

    methods = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Push", "/ray.rpc.CoreWorkerService/NumPendingTasks",
               "/ray.rpc.ReporterService/HealthCheck", "/ray.rpc.RayletDriver/ClusterInfo"]
    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        for m in methods:
            call = channel.unary_unary(m, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"", timeout=3)
                return f"grpc OK for {m}"
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return f"grpc {err.code().name}"
    return "grpc: no probed method"


def listeners(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of these processes."""
    import psutil

    pids = set(pids)
    return sorted({(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in pids})


def check_against_readme(found, rows: list[dict], classify, flags: dict | None = None) -> list[str]:
    """Each listening socket is on 127.0.0.1, has its row in the README table, and is refused
    without a token where the row says `token`. Returns the rows seen."""
    assert found, "no listening sockets found"
    seen = []
    for pid, ip, port in found:
        r = row(rows, classify(pid), port, flags or {})
        seen.append(r["process"])
        assert ip in LOOPBACK, f"{r['process']} listens on {ip}:{port}, not on 127.0.0.1"
        assert r["listens"].startswith("127.0.0.1"), r
        if r["protected"].startswith("token"):
            got = refused_without_token("127.0.0.1", port)
            assert got in ("http 401", "grpc UNAUTHENTICATED"), f"{r['process']} on port {port}: {got} without a token"
        else:
            assert r["protected"].startswith("none"), r
    return seen


def ray_kind(pid: int) -> str:
    """A Ray process, by its command line, as the README's tables name it; '' for a worker or driver."""
    import psutil

    args = psutil.Process(pid).cmdline()
    joined = " ".join(args)
    for needle, kind in (("/gcs/gcs_server", "`gcs_server`"), ("/raylet/raylet", "`raylet`"),
                         ("monitor.py", "`monitor.py`"), ("dashboard/dashboard.py", "`dashboard.py`"),
                         ("ray.util.client.server", "`python -m ray.util.client.server`")):
        if needle in args[0] or (len(args) > 1 and needle in " ".join(args[1:3])):
            return kind
    for title in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        if joined.startswith(title):
            return f"`{title}`"
    return ""


# -- 1. a failed `cluster up` leaves nothing -------------------------------------------------------

def test_failed_up_with_the_gcs_port_taken_leaves_nothing(short_tmp):
    port, dashboard = free_port(), free_port()
    with socket.socket() as taken:  # a plain TCP listener on the GCS port
        taken.bind(("0.0.0.0", port))
        taken.listen()
        start = time.monotonic()
        done = subprocess.run(EMULATE + ["cluster", "up", "--worker-nodes", "1", "--cpus-per-node", "1", "--port",
                                         str(port), "--dashboard-port", str(dashboard)], capture_output=True, text=True,
                              cwd=ROOT, env=clean_env(short_tmp / "home", short_tmp / "c"), timeout=120)
        took = time.monotonic() - start
    assert done.returncode == 2
    assert f"port {port} (--port) is already in use" in one_error_line(done.stderr)
    assert took < 15, took
    assert not list(short_tmp.glob("c/cluster-*.json")) and not list(short_tmp.glob("c/ray-*"))
    assert not processes_named(str(short_tmp / "c"))


FAIL_SCRIPT = """
import socket, sys
from cluster import local
from emulate.errors import EmulateError
mode, port, dashboard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "dashboard":  # the dashboard port taken after the check: Ray fails after starting GCS, monitor, client server
    local._port_in_use = lambda p: False
    taken = socket.socket(); taken.bind(("127.0.0.1", dashboard)); taken.listen()
else:  # the head comes up, then a worker node fails
    local._RAY_START_ON_LOOPBACK = "import sys; sys.exit('worker node refused (test)')"
try:
    local.up(1, 1.0, port, dashboard)
except EmulateError as err:
    print(err)
    sys.exit(2)
"""


@pytest.mark.parametrize("mode", ["dashboard", "worker"])
def test_failed_up_after_ray_started_stops_everything(mode, short_tmp):
    """Ray processes were running when `up` failed: all are stopped, nothing is recorded."""
    port, dashboard = free_port(), free_port()
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FAIL_SCRIPT, mode, str(port), str(dashboard)], capture_output=True,
                          text=True, cwd=ROOT, env=clean_env(short_tmp / "home", short_tmp / "c"), timeout=240)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert "stopped everything `cluster up` had started" in done.stdout
    assert ("already occupied" if mode == "dashboard" else "worker node refused (test)") in done.stdout
    assert not list((short_tmp / "c").glob("cluster-*.json"))
    assert not list((short_tmp / "c").glob("ray-*"))
    time.sleep(0.5)
    assert not processes_named(str(short_tmp / "c")), "processes of the failed cluster are still running"
    assert not processes_named(f"=127.0.0.1:{port}")
    print(f"failed up ({mode}) cleaned up in {took:.1f} s")


# -- 3. the token file ---------------------------------------------------------------------------

TOKEN_SCRIPT = """
import os, sys
from cluster.session import ensure_token
from emulate.errors import EmulateError
os.umask(0)  # the mode must not depend on the umask
try:
    print(ensure_token(force=sys.argv[1] == "force"))
except EmulateError as err:
    print("error:", err)
"""


def test_the_token_file_made_is_0600_in_a_0700_directory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    made = subprocess.run([sys.executable, "-c", TOKEN_SCRIPT, "plain"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)
    token = home / ".ray" / "auth_token"
    assert made.stdout.strip() == str(token), made.stderr
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    first = token.read_text()
    assert len(first) >= 32
    again = subprocess.run([sys.executable, "-c", TOKEN_SCRIPT, "plain"], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=60)
    assert again.stdout.strip() == "None" and token.read_text() == first  # an existing token is kept
    off = subprocess.run([sys.executable, "-c", TOKEN_SCRIPT, "plain"], capture_output=True, text=True, cwd=ROOT,
                         env=clean_env(tmp_path / "other", RAY_AUTH_MODE="disabled"), timeout=60)
    assert off.stdout.strip() == "None" and not (tmp_path / "other" / ".ray").exists()
    bad = subprocess.run([sys.executable, "-c", TOKEN_SCRIPT, "force"], capture_output=True, text=True, cwd=ROOT,
                         env=clean_env(tmp_path / "other", RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing")), timeout=60)
    assert bad.stdout.startswith("error: RAY_AUTH_TOKEN_PATH=") and not (tmp_path / "missing").exists()


# -- 2 and 5: a private instance: its sockets, and joining it without the token --------------------

PRIVATE_SCRIPT = """
import json, os, sys
import ray
from cluster.session import connect
connect(None)
@ray.remote
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])
node = ray._private.worker._global_node
print(json.dumps({"gcs": node.gcs_address, "session_dir": node.get_session_dir_path(), "pid": os.getpid()}), flush=True)
sys.stdin.read()  # until the test is done with it
ray.shutdown()
"""


@pytest.fixture(scope="module")
def private_instance():
    """A private instance as `emulate run --executor ray` starts it, in a child process with its own HOME."""
    base = Path(tempfile.mkdtemp(prefix="emh-", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", PRIVATE_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=clean_env(home))
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        info["home"] = home
        yield info
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_a_private_instance_listens_on_loopback_only_as_documented(private_instance):
    import psutil

    token = private_instance["home"] / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600  # the private instance's token, made by emulate
    driver = private_instance["pid"]
    pids = {driver, *(c.pid for c in psutil.Process(driver).children(recursive=True))}
    pids.update(processes_named(private_instance["session_dir"]))
    for pid in list(pids):
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    rows = readme_table("**Private instance**")

    def classify(pid):
        return ray_kind(pid) or ("the driver" if pid == driver else "each worker")

    seen = check_against_readme(listeners(pids), rows, classify)
    for must in ("`gcs_server`", "`raylet`", "the driver", "each worker", "`ray::DashboardAgent`",
                 "`ray::RuntimeEnvAgent`"):
        assert any(s.startswith(must) for s in seen), (must, seen)


@pytest.mark.parametrize("case, extra, message", [
    ("no token, a missing RAY_AUTH_TOKEN_PATH", {"RAY_AUTH_TOKEN_PATH": "/nonexistent"},
     "requires token authentication: RAY_AUTH_TOKEN_PATH=/nonexistent"),
    ("no token at all", {}, "requires token authentication: no Ray authentication token found"),
    ("a wrong token", {"RAY_AUTH_TOKEN": "w" * 32}, "refused this process's authentication token"),
])
def test_joining_without_the_token_is_one_line_at_once(private_instance, tmp_path, case, extra, message):
    start = time.monotonic()
    done = subprocess.run(EMULATE + ["run", "--executor", "ray", "--address", private_instance["gcs"], "--random-tokens",
                                     "256", "-M", "64"], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(tmp_path, **extra), timeout=120)
    took = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert message in one_error_line(done.stderr), case
    assert took < 10, f"{case}: {took:.1f} s"


def test_joining_a_loopback_instance_with_its_token_works(private_instance):
    done = subprocess.run(EMULATE + ["run", "--executor", "ray", "--address", private_instance["gcs"], "--workers", "1",
                                     "--random-tokens", "256", "-M", "64", "--json"], capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(private_instance["home"]), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["ray_cluster"].startswith("joined")


# -- 4. submit retries Ray's transient refusal -----------------------------------------------------

class _Refusing:
    def __init__(self, refusals: int):
        self.refusals, self.calls = refusals, 0

    def submit_job(self, entrypoint):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError("Request failed with\n  status code 500: No available agent to submit job, please try again later.")
        return "raysubmit_test"


def test_submit_retries_no_available_agent(monkeypatch):
    from cluster import jobs
    from emulate.errors import EmulateError

    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    client = _Refusing(3)
    assert jobs._submit_with_retry(client, "http://x", "true") == "raysubmit_test" and client.calls == 4
    with pytest.raises(EmulateError, match=r"refused the job: status code 500: No available agent .*after retrying for 0 s"):
        jobs._submit_with_retry(_Refusing(10**6), "http://x", "true", retry_s=0)


def test_down_finds_its_processes_by_exact_address_and_directory(short_tmp):
    """The cluster at port P is not the one at port P1 (a longer port with the same digits)."""
    from cluster.local import _processes_of
    from cluster.state import ClusterRecord

    def record(port):
        return ClusterRecord(port=port, dashboard_port=1, client_port=1, temp_dir=f"{short_tmp}/ray-{port}",
                             worker_nodes=0, cpus_per_node=1.0)

    fake = [sys.executable, "-c", "import time; time.sleep(60)"]
    other = subprocess.Popen(fake + ["site-packages/ray/x.py", "--gcs-address=127.0.0.1:63801",
                                     f"--log-dir={short_tmp}/ray-63801/logs"])
    mine = subprocess.Popen(fake + ["site-packages/ray/x.py", "--gcs-address=127.0.0.1:6380"])
    user = subprocess.Popen(fake + ["emulate", "run", "--executor", "ray", "--address=127.0.0.1:6380"])
    try:
        time.sleep(0.5)
        found = _processes_of(record(6380))
        assert mine.pid in found and other.pid not in found and user.pid not in found
        found = _processes_of(record(63801))
        assert other.pid in found and mine.pid not in found
    finally:
        for p in (other, mine, user):
            p.kill()
            p.wait()


# -- 4 and 5: `cluster up && submit` with the CPUs busy, and the cluster's sockets -------------------

@pytest.mark.slow
def test_cluster_up_and_submit_with_busy_cpus(short_tmp):
    """`emulate cluster up && emulate submit -- run ...` with two busy loops taking the CPUs."""
    from cluster.local import _processes_of
    from cluster.state import load

    port, dashboard = free_port(), free_port()
    env = clean_env(short_tmp / "home", short_tmp / "c")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        start = time.monotonic()
        up = subprocess.run(EMULATE + ["cluster", "up", "--worker-nodes", "2", "--cpus-per-node", "1", "--port",
                                       str(port), "--dashboard-port", str(dashboard)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=400)
        up_s = time.monotonic() - start
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout)
        token = short_tmp / "home" / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert state["address"] == f"127.0.0.1:{port}"
        start = time.monotonic()
        sub = subprocess.run(EMULATE + ["submit", "--address", state["dashboard"], "--", "run", "--random-tokens", "512",
                                        "-M", "64", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=400)
        submit_s = time.monotonic() - start
        assert sub.returncode == 0, sub.stderr[-3000:]
        summary = json.loads(next(s for s in sub.stdout.splitlines() if s.startswith("{")))
        assert summary["executor"] == "ray" and summary["ray_cluster"].startswith("joined, 3 node(s)")
        for p in busy:
            p.kill()

        found = listeners(_processes_of(load(Path(state["temp_dir"]).parent, port)))
        seen = check_against_readme(found, readme_table("**`emulate cluster up`**"),
                                    lambda pid: ray_kind(pid) or "workers, the job supervisor",
                                    {"--port": port, "--dashboard-port": dashboard})
        for must in ("`gcs_server`", "`dashboard.py`", "`python -m ray.util.client.server`", "`raylet`"):
            assert any(s.startswith(must) for s in seen), (must, seen)
        assert {p for _, _, p in found} >= {port, dashboard}
        print(f"cluster up {up_s:.1f} s, submit {submit_s:.1f} s with 2 busy loops; {len(found)} listening sockets")
    finally:
        for p in busy:
            p.kill()
            p.wait()
        down = subprocess.run(EMULATE + ["cluster", "down"], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=120)
        assert down.returncode == 0, down.stderr
    assert not processes_named(str(short_tmp / "c"))
    assert not list((short_tmp / "c").glob("cluster-*.json"))


# -- 6. the state directory: only what `cluster up` recorded is stopped or deleted ------------------

def own_state_dir(root: Path) -> Path:
    state = root / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    return state


def plant(state: Path, at: int, **fields) -> Path:
    """A record for port `at` as `cluster up` writes it (cluster/state.py), with `fields` replaced."""
    record = {"port": at, "dashboard_port": free_port(), "client_port": free_port(),
              "temp_dir": str(state / f"ray-{at}"), "worker_nodes": 0, "cpus_per_node": 1.0, "processes": []}
    record.update(fields)
    path = state / f"cluster-{at}.json"
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    return path


@pytest.fixture
def bystander(short_tmp):
    """A process `cluster up` did not start (a `sleep`), and a directory with a file in it outside
    the state directory."""
    import psutil

    victim = short_tmp / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    sleep = subprocess.Popen(["sleep", "300"])
    proc = psutil.Process(sleep.pid)
    yield victim, {"pid": sleep.pid, "started": proc.create_time(), "cmdline": proc.cmdline()}, sleep
    sleep.kill()
    sleep.wait()


def run_cluster(args, env, timeout=60):
    return subprocess.run(EMULATE + ["cluster", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


PLANTED = {
    "a directory outside": lambda victim, entry: {"temp_dir": str(victim), "processes": [entry]},
    "not JSON": lambda victim, entry: "{not json",
    "a port as text": lambda victim, entry: {"port": "6380", "temp_dir": str(victim), "processes": [entry]},
    "a pid as text": lambda victim, entry: {"temp_dir": str(victim), "processes": [{**entry, "pid": str(entry["pid"])}]},
    "a list": lambda victim, entry: [str(victim), entry["pid"]],
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_planted_record_stops_and_deletes_nothing(short_tmp, bystander, case):
    """A record naming a directory outside the state directory and an unrelated process (or not
    of the shape `up` writes): `down`, `status` and `up` are one line, exit 2; the process lives on,
    the directory keeps its file, the record stays for its owner to look at."""
    victim, entry, sleep = bystander
    state = own_state_dir(short_tmp)
    port = free_port()
    fields = PLANTED[case](victim, entry)
    path = plant(state, port) if not isinstance(fields, dict) else plant(state, port, **fields)
    if not isinstance(fields, dict):
        path.write_text(fields if isinstance(fields, str) else json.dumps(fields))
    env = clean_env(short_tmp / "home", state)
    for args in (["down"], ["down", "--port", str(port)], ["status"],
                 ["up", "--port", str(port), "--dashboard-port", str(free_port()), "--worker-nodes", "0"]):
        done = run_cluster(args, env)
        assert done.returncode == 2, (args, done.stderr)
        line = one_error_line(done.stderr)
        assert str(path) in line and "nothing was stopped or deleted" in line, line
        assert sleep.poll() is None, f"{args}: the unrelated process was killed"
        assert (victim / "precious").read_text() == "keep me", args
        assert path.exists() and not (state / f"ray-{port}").exists()


def test_a_pid_that_is_now_another_program_is_not_killed(short_tmp, bystander):
    """A well-formed record of this user's whose pid now belongs to another program (another start
    time, another command line): `down` deletes the cluster's own directory, kills nothing."""
    _, entry, sleep = bystander
    state = own_state_dir(short_tmp)
    ports = free_port(), free_port()
    plant(state, ports[0], processes=[dict(entry, started=entry["started"] - 100.0)])
    plant(state, ports[1], processes=[dict(entry, cmdline=["ray", "start", "--head"])])
    for port in ports:
        (state / f"ray-{port}" / "logs").mkdir(parents=True)
        done = run_cluster(["down", "--port", str(port)], clean_env(short_tmp / "home", state))
        assert done.returncode == 0, done.stderr
        assert sleep.poll() is None and not (state / f"ray-{port}").exists()
        assert not (state / f"cluster-{port}.json").exists()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_state_directory_others_can_write_is_refused(short_tmp, bystander, mode):
    _, entry, sleep = bystander
    state = own_state_dir(short_tmp)
    port = free_port()
    plant(state, port, processes=[entry])
    state.chmod(mode)
    env = clean_env(short_tmp / "home", state)
    for args in (["down"], ["status"], ["up", "--port", str(port), "--dashboard-port", str(free_port())]):
        done = run_cluster(args, env)
        assert done.returncode == 2, (args, done.stderr)
        assert f"{state} is writable by" in one_error_line(done.stderr)
        assert sleep.poll() is None and sorted(p.name for p in state.iterdir()) == [f"cluster-{port}.json"]


@pytest.mark.skipif(os.getuid() != 0, reason="making a file another user's needs root")
@pytest.mark.parametrize("what", ["directory", "record"])
def test_a_state_directory_or_record_of_another_user_is_refused(short_tmp, bystander, what):
    _, entry, sleep = bystander
    state = own_state_dir(short_tmp)
    port = free_port()
    (state / f"ray-{port}").mkdir()
    record = plant(state, port, processes=[entry])
    os.chown(state if what == "directory" else record, 65534, 65534)
    done = run_cluster(["down", "--port", str(port)], clean_env(short_tmp / "home", state))
    assert done.returncode == 2
    assert "owned by uid 65534" in one_error_line(done.stderr)
    assert sleep.poll() is None and (state / f"ray-{port}").exists()


def test_several_clusters_recorded_need_a_port_or_an_address(short_tmp):
    state = own_state_dir(short_tmp)
    ports = sorted((free_port(), free_port()))
    for port in ports:
        plant(state, port)
    env = clean_env(short_tmp / "home", state)
    for args in (["cluster", "down"], ["cluster", "status"]):
        done = subprocess.run(EMULATE + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert done.returncode == 2
        assert f"ports {ports[0]}, {ports[1]}); name one with --port" in one_error_line(done.stderr)
    done = subprocess.run(EMULATE + ["submit", "--", "run", "--random-tokens", "64"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "name the job server with --address" in one_error_line(done.stderr)
    done = run_cluster(["status", "--port", str(ports[0])], env)  # recorded, but nothing listens there
    assert done.returncode == 1 and done.stdout == ""


def test_a_state_directory_too_long_for_rays_sockets_is_one_line(short_tmp):
    state = short_tmp / ("d" * 70)
    done = run_cluster(["up", "--port", str(free_port()), "--dashboard-port", str(free_port()), "--worker-nodes", "0"],
                       clean_env(short_tmp / "home", state))
    assert done.returncode == 2
    assert "too long for Ray's socket paths" in one_error_line(done.stderr)
    assert list(state.iterdir()) == []


def test_the_state_directory_is_this_users_own(tmp_path, short_tmp, monkeypatch):
    """$XDG_RUNTIME_DIR when it is this user's and 0700, else the cache directory, else (a home too
    long for Ray's socket paths) /tmp/emulate-UID; created 0700."""
    from cluster.state import own_dir, ray_sockets_fit, state_dir, temp_dir_for

    monkeypatch.delenv("EMULATE_CLUSTER_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(short_tmp))  # short enough for Ray's socket paths
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    runtime.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert state_dir() == runtime / "emulate" / "cluster"
    runtime.chmod(0o777)  # not usable: another user could plant records there
    assert state_dir() == short_tmp / "emulate" / "cluster"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert own_dir(create=False) is None
    made = own_dir(create=True)
    assert made == short_tmp / "emulate" / "cluster"
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_CACHE_HOME")
    long_home = tmp_path / ("h" * 40)  # /home/someone-with-a-long-name: its cache is past the sockets' limit
    monkeypatch.setenv("HOME", str(long_home))
    assert not ray_sockets_fit(temp_dir_for(long_home / ".cache" / "emulate" / "cluster", 65535))
    assert state_dir() == Path("/tmp") / f"emulate-{os.getuid()}"
    assert ray_sockets_fit(temp_dir_for(state_dir(), 65535))


# -- 7. interrupts: early SIGINT, SIGTERM during `cluster up` ---------------------------------------

def interpreter_start_s() -> float:
    """How long this interpreter takes to run a first line of code (the slowest of three): before
    that, a signal meets Python's own start-up, which no program's code can handle."""
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        child = subprocess.Popen([sys.executable, "-c", "print(1, flush=True)"], stdout=subprocess.PIPE)
        child.stdout.readline()
        times.append(time.monotonic() - t0)
        child.wait()
    return max(times)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5, 1.0])
def test_sigint_while_emulate_starts_is_one_line_and_130(delay, tmp_path):
    """SIGINT `delay` seconds after the interpreter's own start, while the modules are imported and
    the parser is built (or the run has begun). The interpreter's start is measured, and varies on
    a busy machine: a signal that still landed inside it (Python's own traceback, no frame of
    emulate/cli/) is sent again, at most twice; one answered by emulate must be the one line."""
    script = Path(sys.executable).with_name("emulate")
    for attempt in range(3):
        after = interpreter_start_s() + delay
        child = subprocess.Popen([str(script), "run", "--random-tokens", "4096", "-M", "64", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                 env=clean_env(tmp_path / "home"))
        time.sleep(after)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
        if child.returncode != 130 and "emulate/cli/" not in stderr and attempt < 2:
            print(f"SIGINT at {after:.3f} s landed in the interpreter's own start: {stderr.splitlines()[-2:]}")
            continue
        break
    assert child.returncode == 130, (after, stderr[-2000:])
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["emulate: interrupted by SIGINT"], stderr
    assert stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # 28 s here: the head's `ray start` runs before the signal
def test_sigterm_during_cluster_up_stops_what_it_started_and_exits_143(short_tmp):
    import psutil

    state = own_state_dir(short_tmp)
    port, dashboard = free_port(), free_port()
    temp = str(state / f"ray-{port}")
    child = subprocess.Popen(EMULATE + ["cluster", "up", "--worker-nodes", "1", "--cpus-per-node", "1", "--port",
                                        str(port), "--dashboard-port", str(dashboard)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=clean_env(short_tmp / "home", state))
    deadline = time.monotonic() + 120
    def kind(pid):
        try:
            return ray_kind(pid)
        except psutil.Error:  # gone meanwhile
            return ""

    while not any(kind(p) == "`raylet`" for p in processes_named(temp)):  # the head's raylet runs
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "cluster up started no raylet"
        time.sleep(0.1)
    time.sleep(1.0)
    started = [psutil.Process(p) for p in processes_named(temp) if psutil.pid_exists(p)]
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    took = time.monotonic() - sent
    assert child.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "emulate: interrupted by SIGTERM" and "Traceback" not in stderr
    assert "did not finish" not in stderr and stdout == ""
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive and not processes_named(temp)
    assert not processes_named(f"=127.0.0.1:{port}")
    assert list(state.iterdir()) == []
    print(f"SIGTERM during cluster up: {len(started)} Ray processes stopped, exit 143 after {took:.1f} s")


# -- 8. two clusters by port; submit finds the cluster and its stdout is the run's alone ------------

@pytest.mark.slow
def test_two_clusters_by_port_and_submit_prints_the_json_alone(short_tmp):
    state = own_state_dir(short_tmp)
    env = clean_env(short_tmp / "home", state)
    ports = [(free_port(), free_port()) for _ in range(2)]
    try:
        for port, dashboard in ports:
            t0 = time.monotonic()
            up = run_cluster(["up", "--worker-nodes", "0", "--cpus-per-node", "2", "--port", str(port),
                              "--dashboard-port", str(dashboard)], env, timeout=400)
            assert up.returncode == 0, up.stderr
            assert "emulate: starting a Ray head and 0 worker node(s)" in up.stderr
            print(f"cluster up on port {port}: {time.monotonic() - t0:.1f} s")
        for port, dashboard in ports:
            status = run_cluster(["status", "--port", str(port)], env)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["dashboard"] == f"http://127.0.0.1:{dashboard}"
        assert run_cluster(["status"], env).returncode == 2  # which one?
        down = run_cluster(["down", "--port", str(ports[0][0])], env, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not processes_named(str(state / f"ray-{ports[0][0]}"))
        assert run_cluster(["status", "--port", str(ports[0][0])], env).returncode == 1
        assert run_cluster(["status"], env).returncode == 0  # the other one runs on, and is the only one now

        t0 = time.monotonic()
        sub = subprocess.run(EMULATE + ["submit", "--", "run", "--random-tokens", "512", "-M", "64", "--workers", "1",
                                        "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
        assert sub.returncode == 0, sub.stderr[-3000:]
        summary = json.loads(sub.stdout)  # stdout is the JSON object and nothing else
        assert summary["executor"] == "ray" and summary["ray_cluster"].startswith("joined, 1 node(s)")
        assert f"submitted to http://127.0.0.1:{ports[1][1]}" in sub.stderr
        assert "Running entrypoint for job" in sub.stderr and "succeeded" in sub.stderr
        print(f"submit to the recorded cluster: {time.monotonic() - t0:.1f} s")
    finally:
        for port, _ in ports:
            run_cluster(["down", "--port", str(port)], env, timeout=120)
    assert not processes_named(str(state)) and list(state.iterdir()) == []
