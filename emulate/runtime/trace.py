"""The executed schedule as Chrome trace-event JSON (opens in Perfetto or chrome://tracing).

Both executors write it: the Ray executor one complete ('X') slice per physical task on one track
per worker, the local executor one slice per logical node on one track per call worker (a single
track when its calls run in turn). Each slice's args
hold the task's index (`task`), the logical nodes it ran (`nodes`) and the tasks whose values it
read (`deps`, task indices), so the schedule's dependency DAG, and with it the critical path, can
be read back from the file alone (graphs.pictures.gantt).

`read_trace` reads such a file back and checks it is one: anything else fails with a `TraceError`
of one line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from emulate.errors import EmulateError
from emulate.outputs import atomic_write_text

OPTIONAL_ARGS = ("bytes_in", "bytes_out")  # per-task figures copied into the slice's args when recorded


class TraceError(EmulateError, ValueError):
    """A file that is not a readable Chrome trace of an emulate run."""


def trace_events(records: list[dict], workers: list[dict], t0: float, process: str = "emulate ray executor") -> list[dict]:
    """Trace events for `records`: one dict per finished task, times in seconds on the clock of `t0`.

    A record holds task (its index), name, kind, worker, start, end, nodes (logical node ids) and,
    when known, deps (indices of the tasks it read from), pid, bytes_in and bytes_out.
    `workers`: one dict per track, with worker (the track id) and either label or host and pid.
    """
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": process}}]
    for w in workers:
        label = w.get("label") or f"worker {w['worker']} ({w['host']}, pid {w['pid']})"
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": w["worker"], "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": w["worker"],
                       "args": {"sort_index": w["worker"]}})
    for r in records:
        args = {"task": r["task"], "nodes": r["nodes"]}
        if "deps" in r:
            args["deps"] = sorted(set(r["deps"]))
        args.update({k: r[k] for k in OPTIONAL_ARGS if k in r})
        if "pid" in r:
            args["worker_pid"] = r["pid"]
        events.append({
            "name": r["name"], "cat": str(r["kind"]), "ph": "X", "pid": 1, "tid": r["worker"],
            "ts": round((r["start"] - t0) * 1e6, 1), "dur": round(max(r["end"] - r["start"], 0.0) * 1e6, 1),
            "args": args,
        })
    return events


def write_trace(path: str, records: list[dict], workers: list[dict], t0: float,
                process: str = "emulate ray executor") -> None:
    """Write the trace atomically (a temporary file beside `path`, renamed into place)."""
    atomic_write_text(path, json.dumps({"traceEvents": trace_events(records, workers, t0, process),
                                        "displayTimeUnit": "ms"}))


def check_trace_path(path: str) -> None:
    """Refuse, before any work, a trace path that cannot be written: one line (emulate/inputs.py, output_target)."""
    from emulate.outputs import output_target

    output_target(path)


def read_trace(path) -> list[dict]:
    """The events of a Chrome trace file (object with traceEvents, or a bare array), checked.

    Raises TraceError (one line) for a file that cannot be read, is not JSON, is not a trace, or
    holds no complete ('X') event with a name, a track and finite times.
    """
    where = f"trace {path}"
    try:
        text = _read_bounded(Path(path), where)
    except FileNotFoundError:
        raise TraceError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{where}: is a directory, not a trace file") from None
    except UnicodeDecodeError:
        raise TraceError(f"{where}: not a text file (a Chrome trace is JSON)") from None
    except OSError as err:
        raise TraceError(f"{where}: cannot read: {err.strerror or err}") from None
    if not text.strip():
        raise TraceError(f"{where}: the file is empty")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: also a number of more than 4300 digits
        detail = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else \
            "nested too deep" if isinstance(err, RecursionError) else str(err).split(":")[0]
        raise TraceError(f"{where}: not JSON ({detail})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise TraceError(f"{where}: not a Chrome trace (expected an object with a traceEvents list, or a list of events)")
    events = [e for e in events if isinstance(e, dict)]
    complete = [e for e in events if e.get("ph") == "X"]
    if not complete:
        raise TraceError(f"{where}: holds no complete ('X') events: nothing was scheduled")
    for k, e in enumerate(complete):
        bad = [f for f in ("ts", "dur") if not _finite(e.get(f))]
        if bad or not _track(e.get("tid")) or not isinstance(e.get("name"), str):
            what = ", ".join(bad) or ("tid" if not _track(e.get("tid")) else "name")
            raise TraceError(f"{where}: complete event {k} ({_short(e.get('name', '?'))}) has no valid {what}")
        if e["dur"] < 0:
            raise TraceError(f"{where}: complete event {k} ({e['name']!r}) has a negative duration")
        if abs(e["ts"]) > MAX_TRACE_US or e["dur"] > MAX_TRACE_US:
            raise TraceError(f"{where}: complete event {k} ({e['name']!r}) has a time past {MAX_TRACE_US:.0e} us "
                             "(decades): not a recorded schedule")
        problem = _args_problem(e)
        if problem:
            raise TraceError(f"{where}: complete event {k} ({e['name']!r}) {problem}")
    for k, e in enumerate(x for x in events if x.get("ph") == "M"):
        args = e.get("args", {})
        if not isinstance(args, dict) or not _track(e.get("tid", 0)) or not isinstance(args.get("name", ""), str) \
                or not _finite(args.get("sort_index", 0)):
            raise TraceError(f"{where}: metadata event {k} ({_short(e.get('name', '?'))}) has fields of the wrong type")
    return events


# The times of a trace are microseconds; 10^15 us is 31 years, more than any run records.
MAX_TRACE_US = 1e15


def _track(tid) -> bool:
    """A track (thread) id: an integer or a string, as Chrome's trace format has them."""
    return isinstance(tid, (int, str)) and not isinstance(tid, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _args_problem(e: dict) -> str | None:
    """What is wrong with a complete event's args (its task id and dependencies), if anything."""
    args = e.get("args", {})
    if not isinstance(args, dict):
        return "has args that are not an object"
    task = args.get("task")
    if task is not None and not _track(task):
        return f"has a task id {_short(task)} that is not an integer or a string"
    deps = args.get("deps")
    if deps is not None and not (isinstance(deps, list) and all(_track(d) for d in deps)):
        return "has deps that are not a list of task ids"
    nodes = args.get("nodes")
    if nodes is not None and not isinstance(nodes, list):
        return "has nodes that are not a list"
    return None


# A trace of the ten-million-token run (133,104 nodes) is about 40 MB; ten times that is no trace of ours
# and would be read into memory whole.
MAX_TRACE_BYTES = 512 * 2**20


def _read_bounded(path: Path, where: str) -> str:
    """The file's text, read only from a regular file and never past MAX_TRACE_BYTES: a FIFO would wait
    for a writer forever, and a device or an endless file would fill the memory."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise TraceError(f"{where}: not a regular file (a FIFO, socket or device); give the trace file itself")
        if st.st_size > MAX_TRACE_BYTES:
            raise TraceError(f"{where}: {st.st_size / 2**20:.0f} MiB, more than a trace of this tool's "
                             f"({MAX_TRACE_BYTES / 2**20:.0f} MiB at most)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_TRACE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TRACE_BYTES:  # grew while it was read
        raise TraceError(f"{where}: more than {MAX_TRACE_BYTES / 2**20:.0f} MiB, more than a trace of this tool's")
    return data.decode("utf-8")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
