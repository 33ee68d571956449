"""The executed schedule as a Chrome trace-event JSON (opens in Perfetto or chrome://tracing).

One track per worker (a thread of one process), one complete ('X') slice per physical task,
with the logical nodes it ran in its args.
"""
from __future__ import annotations

import json

from emulate.io import atomic_write_text


def trace_events(records: list[dict], workers: list[dict], t0: float) -> list[dict]:
    """`records`: one dict per finished task (task, worker, start, end, nodes, bytes); times in s."""
    events = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "emulate ray executor"}}]
    for w in workers:
        label = f"worker {w['worker']} ({w['host']}, pid {w['pid']})"
        events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": w["worker"], "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": w["worker"],
                       "args": {"sort_index": w["worker"]}})
    for r in records:
        events.append({
            "name": r["name"], "cat": r["kind"], "ph": "X", "pid": 1, "tid": r["worker"],
            "ts": round((r["start"] - t0) * 1e6, 1), "dur": round(max(r["end"] - r["start"], 0.0) * 1e6, 1),
            "args": {"task": r["task"], "nodes": r["nodes"], "bytes_in": r["bytes_in"],
                     "bytes_out": r["bytes_out"], "worker_pid": r["pid"]},
        })
    return events


def write_trace(path: str, records: list[dict], workers: list[dict], t0: float) -> None:
    atomic_write_text(path, json.dumps({"traceEvents": trace_events(records, workers, t0),
                                        "displayTimeUnit": "ms"}))
