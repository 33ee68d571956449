"""The executed schedule as a Chrome trace-event JSON: the writer now lives in emulate/trace.py,
shared by both executors; this module re-exports it for the Ray executor."""
from __future__ import annotations

from emulate.trace import read_trace, trace_events, write_trace

__all__ = ["read_trace", "trace_events", "write_trace"]
