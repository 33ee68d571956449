"""What `emulate cluster up` records, so that `down` stops that cluster and nothing else.

The records live in a directory of this user's own: $EMULATE_CLUSTER_DIR, else
$XDG_RUNTIME_DIR/emulate/cluster when that directory is usable (this user's, mode 0700 as the XDG
base directory specification asks), else ~/.cache/emulate/cluster ($XDG_CACHE_HOME when set), unless
that path is too long for Ray's socket paths (a long home directory), then /tmp/emulate-UID. It is
created with mode 0700; one owned by another user, or writable by group or others, is refused:
whoever can write there could plant a record, and a record says which processes to kill and which
directory to delete. One record per cluster, `cluster-PORT.json` (PORT: the head's GCS port), names
the cluster's Ray directory (always `ray-PORT` inside the state directory) and the processes `up`
started, each with its start time and command line. `down` kills a recorded process only while
its start time and command line still match (a pid reused by another program does not), with its
descendants (the workers and job drivers its raylet started later), and deletes only the recorded
Ray directory. A record that is not this user's regular file, not JSON of the expected shape, or
names a directory elsewhere is refused in one line before anything is stopped or deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emulate.errors import EmulateError

HOST = "127.0.0.1"
RECORD_MAX_BYTES = 1 << 20
SOCKET_PATH_MAX = 107  # bytes in an AF_UNIX socket path (ray/_private/utils.py, validate_socket_filepath)


@dataclass(frozen=True)
class Started:
    """A process `cluster up` started: its pid, start time (seconds since the epoch, as psutil's
    create_time reads /proc/PID/stat) and command line when it was recorded."""

    pid: int
    started: float
    cmdline: tuple[str, ...]


@dataclass(frozen=True)
class ClusterRecord:
    """One local cluster: its ports and addresses, its Ray directory and the processes it started."""

    port: int
    dashboard_port: int
    client_port: int
    temp_dir: str
    worker_nodes: int
    cpus_per_node: float
    processes: tuple[Started, ...] = field(default=())

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def client_server(self) -> str:
        return f"ray://{HOST}:{self.client_port}"

    def summary(self) -> dict:
        """What `cluster up` and `cluster status` print."""
        return {"address": self.address, "dashboard": self.dashboard, "client_server": self.client_server,
                "temp_dir": self.temp_dir, "worker_nodes": self.worker_nodes, "cpus_per_node": self.cpus_per_node}


def state_dir() -> Path:
    """Where the records live (this module's docstring): not created, not checked."""
    override = os.environ.get("EMULATE_CLUSTER_DIR")
    if override:
        return Path(override).absolute()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and _why_not_own(Path(runtime)) is None:
        return Path(runtime) / "emulate" / "cluster"
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    if not ray_sockets_fit(temp_dir_for(base / "emulate" / "cluster", 65535)):
        # a short directory of this user's own, checked like any other (own_dir): another user who
        # made it first gets a refusal, never a say in what `down` stops
        return Path("/tmp") / f"emulate-{os.getuid()}"
    return base / "emulate" / "cluster"


def ray_sockets_fit(temp: Path) -> bool:
    """Whether Ray's longest socket path under `temp` fits AF_UNIX's limit: Ray puts them at
    TEMP/session_<date>_<time>_<pid>/sockets/plasma_store and refuses a longer one only after
    seconds of starting."""
    longest = temp / "session_2026-01-01_00-00-00_000000_4194304" / "sockets" / "plasma_store"
    return len(os.fsencode(longest)) <= SOCKET_PATH_MAX


def _why_not_own(path: Path) -> str | None:
    """Why `path` is no directory of this user's alone, or None when it is one."""
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if stat.S_ISLNK(link.st_mode) and link.st_uid != os.getuid():
        return f"a symbolic link owned by uid {link.st_uid}, not this user (uid {os.getuid()})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by {'group and others' if st.st_mode & 0o022 == 0o022 else 'group' if st.st_mode & 0o020 else 'others'} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def own_dir(create: bool) -> Path | None:
    """The state directory, checked to be this user's alone (created with mode 0700 when `create`);
    None when it does not exist and `create` is False. Any other user's hand in it is one line."""
    path = state_dir()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass
    why = _why_not_own(path)
    if why == "missing" and not create:
        return None
    if why is not None:
        raise EmulateError(f"the cluster state directory {path} is {why}; refusing to use it "
                           "(chmod 700 it if it is yours, or set EMULATE_CLUSTER_DIR to a directory of your own)")
    return Path(os.path.realpath(path))


def record_path(directory: Path, port: int) -> Path:
    return directory / f"cluster-{port}.json"


def temp_dir_for(directory: Path, port: int) -> Path:
    return directory / f"ray-{port}"


def recorded_ports(directory: Path) -> list[int]:
    ports = []
    for p in directory.glob("cluster-*.json"):
        digits = p.stem.removeprefix("cluster-")
        if digits.isdigit():
            ports.append(int(digits))
    return sorted(ports)


def save(directory: Path, record: ClusterRecord) -> None:
    """Write the record whole (a temporary file renamed over it), mode 0600."""
    path = record_path(directory, record.port)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    tmp.replace(path)


def load(directory: Path, port: int) -> ClusterRecord | None:
    """The record for `port`, checked (this module's docstring); None when there is none."""
    path = record_path(directory, port)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _refused(path, f"cannot be opened ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refused(path, "is not a regular file")
        if st.st_uid != os.getuid():
            raise _refused(path, f"is owned by uid {st.st_uid}, not this user (uid {os.getuid()})")
        if st.st_mode & 0o022:
            raise _refused(path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
        raw = f.read(RECORD_MAX_BYTES + 1)
    if len(raw) > RECORD_MAX_BYTES:
        raise _refused(path, f"is larger than {RECORD_MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refused(path, "is not valid JSON") from None
    return _parse(data, directory, port, path)


def _refused(path: Path, why: str) -> EmulateError:
    return EmulateError(f"the cluster record {path} {why}; nothing was stopped or deleted "
                        "(remove the file if it is not one `emulate cluster up` wrote)")


def _parse(data, directory: Path, port: int, path: Path) -> ClusterRecord:
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(data, dict):
        raise _refused(path, "is not a JSON object")
    shape = {"port": integer, "dashboard_port": integer, "client_port": integer, "temp_dir": lambda v: isinstance(v, str),
             "worker_nodes": integer, "cpus_per_node": lambda v: integer(v) or isinstance(v, float),
             "processes": lambda v: isinstance(v, list)}
    for key, ok in shape.items():
        if key not in data or not ok(data[key]):
            raise _refused(path, f"has no valid {key!r}")
    if data["port"] != port:
        raise _refused(path, f"names port {data['port']}, not {port}")
    if data["temp_dir"] != str(temp_dir_for(directory, port)):
        raise _refused(path, f"names the directory {data['temp_dir']!r}, not {temp_dir_for(directory, port)} "
                             "inside the state directory")
    processes = []
    for p in data["processes"]:
        if not (isinstance(p, dict) and integer(p.get("pid")) and p["pid"] > 1
                and isinstance(p.get("started"), (int, float)) and not isinstance(p.get("started"), bool)
                and isinstance(p.get("cmdline"), list) and all(isinstance(a, str) for a in p["cmdline"])):
            raise _refused(path, "has a malformed process entry")
        processes.append(Started(p["pid"], float(p["started"]), tuple(p["cmdline"])))
    return ClusterRecord(port=port, dashboard_port=data["dashboard_port"], client_port=data["client_port"],
                         temp_dir=data["temp_dir"], worker_nodes=data["worker_nodes"],
                         cpus_per_node=float(data["cpus_per_node"]), processes=tuple(processes))


def forget(directory: Path, record: ClusterRecord) -> None:
    """Delete the record and its Ray directory, which load() checked to be `ray-PORT` in `directory`;
    a symbolic link there, or a directory of another user's, is left alone."""
    temp = temp_dir_for(directory, record.port)
    try:
        st = os.lstat(temp)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(temp, ignore_errors=True)
    record_path(directory, record.port).unlink(missing_ok=True)
    record_path(directory, record.port).with_suffix(".tmp").unlink(missing_ok=True)


def snapshot(pids) -> tuple[Started, ...]:
    """Records of these processes (this user's only) as they are now."""
    import psutil

    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.uids().real != os.getuid():
                continue
            out.append(Started(pid, proc.create_time(), tuple(proc.cmdline())))
        except psutil.Error:  # gone meanwhile
            continue
    return tuple(out)


def still_ours(entry: Started):
    """The psutil.Process for a recorded process that is still the one recorded (same start time and
    command line, this user's), else None."""
    import psutil

    try:
        proc = psutil.Process(entry.pid)
        same = (abs(proc.create_time() - entry.started) < 0.05 and tuple(proc.cmdline()) == entry.cmdline
                and proc.uids().real == os.getuid())
        return proc if same and proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None
