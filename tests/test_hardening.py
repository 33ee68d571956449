"""Hostile input and signals on a real child process: output paths, interrupts, absurd sizes and
numbers, and broken or special input files. Each gets one line on stderr and its exit status, and
nothing that stood at an output path is harmed."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from emulate.cli import main

EMULATE = Path(sys.executable).with_name("emulate")
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
ROOT = Path(__file__).resolve().parents[1]


def emulate_child(*args, timeout=120, umask=None, **kw) -> subprocess.CompletedProcess:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([str(EMULATE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=CHILD_ENV, preexec_fn=preexec, **kw)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- output paths ---------------------------------------------------------------------------------

def special_files(tmp: Path) -> dict[str, Path]:
    """A FIFO, a socket, a directory and (as root) a character device like /dev/full, made here."""
    made = {"fifo": tmp / "fifo", "directory": tmp / "dir", "socket": tmp / "sock"}
    os.mkfifo(made["fifo"])
    made["directory"].mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(made["socket"]))
    sock.close()
    if os.geteuid() == 0:
        made["device"] = tmp / "full"
        os.mknod(made["device"], stat.S_IFCHR | 0o666, os.makedev(1, 7))
    return made


@pytest.mark.parametrize("command", [["run", "--random-tokens", "64", "-M", "16", "--output"],
                                     ["run", "--random-tokens", "64", "-M", "16", "--trace"],
                                     ["graph", "--random-tokens", "64", "-M", "16", "-o"],
                                     ["graph", "--random-tokens", "64", "-M", "16", "--coverage"]])
def test_a_special_file_at_the_output_path_is_refused_and_left_alone(tmp_path, capsys, command):
    for kind, path in special_files(tmp_path).items():
        before = path.lstat()
        assert main([*command, str(path)]) == 2, kind
        line = one_error_line(capsys.readouterr().err)
        assert "not a regular file" in line or "is a directory" in line, line
        after = path.lstat()
        assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino, stat.S_IFMT(before.st_mode)), kind
        link = tmp_path / f"link-to-{kind}"
        link.symlink_to(path)
        assert main([*command, str(link)]) == 2, kind  # a link to it is refused the same way
        capsys.readouterr()
        assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_a_symlink_to_a_regular_file_writes_the_target(tmp_path, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(["graph", "--random-tokens", "64", "-M", "16", "-o", str(link)]) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["nodes"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_a_plain_open_would(tmp_path, umask):
    want = 0o666 & ~umask
    out = emulate_child("run", "--random-tokens", "64", "-M", "16", "-o", tmp_path / "o.arrow", umask=umask)
    assert out.returncode == 0, out.stderr
    graph = emulate_child("graph", "--random-tokens", "64", "-M", "16", "-o", tmp_path / "g.json", umask=umask)
    assert graph.returncode == 0, graph.stderr
    plot = emulate_child("theorems", "--max-tokens", "32", "-M", "16", "--results", "full", "--plot",
                         tmp_path / "p.png", umask=umask)
    assert plot.returncode == 0, plot.stderr
    for name in ("o.arrow", "g.json", "p.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, (name, oct(want))


def test_an_existing_file_keeps_its_mode(tmp_path, capsys):
    target = tmp_path / "g.json"
    target.write_text("")
    target.chmod(0o640)
    assert main(["graph", "--random-tokens", "64", "-M", "16", "-o", str(target)]) == 0
    capsys.readouterr()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.stat().st_size > 0


@pytest.mark.parametrize("path", ["/proc/emulate-test.arrow", "/proc/self/status"])
def test_a_path_the_os_refuses_is_one_line(capsys, path):
    assert main(["run", "--random-tokens", "64", "-M", "16", "--output", path]) == 2
    one_error_line(capsys.readouterr().err)


# -- signals ----------------------------------------------------------------------------------------

def start_long_run(tmp_path: Path, *extra) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out.arrow"
    child = subprocess.Popen([str(EMULATE), "run", "--random-tokens", "400000", "-M", "1024", "--attention", "sliding",
                              "--window", "512", "--output", str(out), "--json", "--quiet", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):  # the forward has begun writing
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.05)
    return child, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_local_run_cleans_up_and_exits_128_plus_the_signal(tmp_path, sig):
    child, out = start_long_run(tmp_path)
    sent = time.monotonic()
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert child.returncode == 128 + sig
    assert one_error_line(stderr) == f"emulate: interrupted by {signal.Signals(sig).name}"
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_an_interrupted_ray_run_exits_143_and_leaves_nothing_running(tmp_path):
    child, out = start_long_run(tmp_path, "--executor", "ray", "--workers", "1")
    deadline = time.monotonic() + 120
    while not any("default_worker" in " ".join(p.info["cmdline"] or []) for p in private_ray_processes(child.pid)):
        assert child.poll() is None, child.communicate()  # the worker actor is up: the forward runs on Ray
        assert time.monotonic() < deadline, "no Ray worker started"
        time.sleep(0.1)
    time.sleep(1)
    spawned = private_ray_processes(child.pid)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=90)
    assert child.returncode == 143, stderr
    assert one_error_line(stderr) == "emulate: interrupted by SIGTERM"
    assert stdout == "" and list(tmp_path.iterdir()) == []
    gone, alive = psutil.wait_procs(spawned, timeout=30)
    assert not alive, [(p.pid, p.ppid(), p.create_time() - time.time(), [a for a in p.cmdline() if "session" in a][:1])
                       for p in alive]


def private_ray_processes(driver: int) -> list[psutil.Process]:
    """The processes of the Ray instance a driver started: Ray names its session directory
    session_<date>_<time>_<driver pid>, and every process of the instance carries it."""
    mark = f"_{driver}/"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != driver and any(mark in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


NOISY_CHILD = r"""
import os, sys
import emulate.api
from emulate.cli import main

real_run = emulate.api.run  # the run `emulate run` calls (emulate/cli/run.py)

def noisy(*args, **kwargs):
    os.write(1, b"(raylet) a line a library wrote to fd 1\n")  # as Ray's C++ core and log threads do
    return real_run(*args, **kwargs)

emulate.api.run = noisy
sys.exit(main(["run", "--random-tokens", "64", "-M", "16", "--json"]))
"""


def test_json_stdout_carries_the_json_object_alone_whatever_writes_to_fd_1():
    out = subprocess.run([sys.executable, "-c", NOISY_CHILD], capture_output=True, text=True, timeout=120,
                         env=CHILD_ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and json.loads(out.stdout)["tokens"] == 64
    assert "(raylet)" in out.stderr


# -- sizes and numbers --------------------------------------------------------------------------------

def test_an_absurd_size_is_refused_before_allocating(tmp_path):
    t0 = time.monotonic()
    child = subprocess.Popen([str(EMULATE), "run", "--random-tokens", "1000000000", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, psutil.Process(child.pid).memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    stdout, stderr = child.communicate()
    assert child.returncode == 2 and stdout == ""
    line = one_error_line(stderr)
    assert "would hold about" in line and "available" in line
    assert peak < 1.5 * 2**30, peak  # torch and the model, not 8 GB of token ids
    assert time.monotonic() - t0 < 60


def test_interrupting_a_large_graph_build_is_prompt(tmp_path):
    child = subprocess.Popen([str(EMULATE), "graph", "--random-tokens", "1000000", "-M", "32", "--attention", "sliding",
                              "--window", "16", "-o", str(tmp_path / "g.json"), "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    time.sleep(6)  # past start-up, into the graph build (about 180,000 nodes)
    assert child.poll() is None, child.communicate()
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    took = time.monotonic() - sent
    assert child.returncode == 130 and one_error_line(stderr) == "emulate: interrupted by SIGINT"
    assert took < 3, took  # within a second when the machine is idle; the bound leaves room for a busy one
    assert list(tmp_path.iterdir()) == []


ABSURD = [
    ["--random-tokens", "-5"], ["--random-tokens", str(10**30)], ["--block-size", "-1"], ["--block-size", "0"],
    ["--window", "-3", "--attention", "sliding"], ["--window", str(10**30), "--attention", "sliding"],
    ["--sinks", "0", "--attention", "sink", "--window", "8"], ["--sinks", str(10**20), "--attention", "sink", "--window", "8"],
    ["--seed", "-1"], ["--seed", str(2**64)], ["--pack-heads", "0", "--oracle", "paper"],
    ["--pack-heads", "9", "--oracle", "paper"], ["--tolerance", "nan", "--verify"], ["--tolerance", "inf", "--verify"],
    ["--tolerance", "-1", "--verify"], ["--executor", "ray", "--stall-timeout", "-1"],
    ["--executor", "ray", "--stall-timeout", "nan"], ["--executor", "ray", "--cpus-per-worker", "inf"],
    ["--executor", "ray", "--cpus-per-worker", "0"], ["--executor", "ray", "--gpus-per-worker", "-1"],
    ["--executor", "ray", "--workers", "-2"], ["--block-size", "nan"], ["--window", "1e3", "--attention", "sliding"],
]


@pytest.mark.parametrize("args", ABSURD, ids=[" ".join(a)[:40] for a in ABSURD])
def test_absurd_numbers_are_one_line_and_exit_2(capsys, args):
    base = [] if "--random-tokens" in args else ["--random-tokens", "64", "-M", "16"]
    assert main(["run", *base, *args]) == 2
    one_error_line(capsys.readouterr().err)


def test_absurd_theorem_sweeps_are_refused(capsys):
    assert main(["theorems", "--max-tokens", str(10**12)]) == 2
    assert "invocations" in one_error_line(capsys.readouterr().err)


# -- input files --------------------------------------------------------------------------------------

def broken_inputs(tmp: Path) -> dict[str, Path]:
    np.save(tmp / "ok.npy", np.arange(10))
    good = (tmp / "ok.npy").read_bytes()
    files = {name: tmp / name for name in ("empty.npy", "empty.arrow", "empty.parquet", "empty.txt", "truncated.npy",
                                           "lying.npy", "latin1.txt", "garbage.arrow")}
    for name in ("empty.npy", "empty.arrow", "empty.parquet", "empty.txt"):
        files[name].write_bytes(b"")
    files["truncated.npy"].write_bytes(good[:-20])
    files["lying.npy"].write_bytes(good.replace(b"(10,)", b"(10000000000,)"))
    files["latin1.txt"].write_bytes("déjà vu".encode("latin-1"))
    files["garbage.arrow"].write_bytes(b"ARROW1" + os.urandom(200))
    for name in ("fifo.npy", "fifo.txt", "fifo.arrow"):
        os.mkfifo(tmp / name)
        files[name] = tmp / name
    return files


def test_broken_and_special_input_files_are_one_line_without_hanging(tmp_path):
    for name, path in broken_inputs(tmp_path).items():
        out = emulate_child("run", "--input", path, "--json", timeout=60)
        assert out.returncode == 2 and out.stdout == "", (name, out.stderr)
        one_error_line(out.stderr)


def test_text_that_is_not_utf8_on_the_command_line_is_one_line():
    out = subprocess.run([os.fsencode(EMULATE), b"run", b"--text", b"caf\xe9 \xff", b"--json"], capture_output=True,
                         timeout=60, env=CHILD_ENV)
    assert out.returncode == 2 and out.stdout == b""
    assert "not valid UTF-8" in one_error_line(out.stderr.decode())


CLUSTER_ABSURD = [["--worker-nodes", "-1"], ["--worker-nodes", str(10**11)], ["--cpus-per-node", "nan"],
                  ["--cpus-per-node", "-2"], ["--port", "99999"], ["--dashboard-port", "0"]]


@pytest.mark.parametrize("args", CLUSTER_ABSURD, ids=[" ".join(a) for a in CLUSTER_ABSURD])
def test_absurd_cluster_options_are_refused_before_starting_anything(capsys, tmp_path, monkeypatch, args):
    monkeypatch.setenv("EMULATE_CLUSTER_DIR", str(tmp_path))
    assert main(["cluster", "up", *args]) == 2
    one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_no_owner_removed_is_removed_by_the_interrupt_clean_up(tmp_path):
    """An interrupt can land after a temporary output exists and before anything could remove it;
    its name was registered before the file was created, and the CLI's clean-up removes it."""
    from graphs.files import PENDING, AtomicFile, remove_pending

    orphan = AtomicFile(tmp_path / "out.arrow")  # as if the interrupt came right after this line
    assert Path(orphan.tmp).exists() and orphan.tmp in PENDING
    remove_pending()
    assert list(tmp_path.iterdir()) == [] and orphan.tmp not in PENDING


# -- reading a trace that is not a file ---------------------------------------------------------

def test_a_trace_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    """A FIFO would wait for a writer forever and /dev/zero would fill the memory: both are one line."""
    fifo = tmp_path / "trace.json"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):
        start = time.monotonic()
        done = emulate_child("trace", source, "-o", tmp_path / "gantt.png", timeout=60)
        assert done.returncode == 2 and time.monotonic() - start < 30, done.stderr
        assert "not a regular file" in one_error_line(done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]  # nothing written



def test_a_small_file_of_many_ids_is_refused_before_its_ids_are_read(tmp_path):
    """10^8 zero ids compress to under a megabyte of Parquet; reading them would take 800 MB before the
    size check. The file's own row count is checked first (emulate/inputs.py, read_tokens)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "many.parquet"
    chunk = pa.table({"token": np.zeros(10**7, dtype=np.int64)})  # ten row groups: the runner stays small
    with pq.ParquetWriter(path, chunk.schema, compression="zstd") as writer:
        for _ in range(10):
            writer.write_table(chunk)
    assert path.stat().st_size < 2**20
    # VmHWM (peak_rss_mb), not ru_maxrss: the latter carries the test runner's own peak across exec.
    code = ("import emulate\nfrom emulate.runtime.memory import peak_rss_mb\n"
            f"try:\n    emulate.run('tiny-llama', input={str(path)!r}, block_size=256)\n"
            "except emulate.EmulateError as err:\n    print(err)\n"
            "print(int(peak_rss_mb()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    message, peak_mb = done.stdout.strip().splitlines()
    assert "100000000 tokens at M = 256 would hold" in message, done.stderr
    assert int(peak_mb) < 700, peak_mb  # torch and the model, not the 800 MB of ids
