"""Progress of a command's long stages on stderr (`ProgressReport`), shared by `emulate run`
(emulate/cli/run.py) and `emulate graph` (emulate/cli/graph.py), and passed to the library's
`progress=` (emulate/api.py)."""
from __future__ import annotations

import sys


class ProgressReport:
    """Progress of the long stages on stderr: a bar per stage where stderr is a terminal; in logs a
    plain line every 10% or 10 s once a stage has run for 5 s (quick runs stay quiet). --json
    governs stdout only; --quiet turns this off."""

    LABELS = {"graph": "building the graph (layers)", "forward": "forward (calls)", "reference": "monolithic reference (layers)",
              "load": "loading the GGUF file with transformers: it dequantises every tensor, with no progress of its own"}
    # stages that give no progress while they run: one line as they begin, whatever their length
    ANNOUNCED = frozenset({"load"})
    QUIET_FOR_S, EVERY_S, EVERY_PERCENT = 5.0, 10.0, 10

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.stage, self.bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if stage != self.stage:
            self.close()
            self.stage, self.start, self.last_line, self.last_percent = stage, now, now, 0
        label = self.LABELS.get(stage, stage)
        if stage in self.ANNOUNCED:
            if done == 0:
                print(f"emulate: {label}", file=sys.stderr, flush=True)
            return
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            self.bar.update(done - self.bar.n)
            return
        percent = 100 * done // max(total, 1)
        due = percent >= self.last_percent + self.EVERY_PERCENT or now - self.last_line >= self.EVERY_S or done == total
        if due and now - self.start >= self.QUIET_FOR_S:
            print(f"emulate: {label} {done}/{total} ({percent}%) after {now - self.start:.0f} s", file=sys.stderr,
                  flush=True)
            self.last_line, self.last_percent = now, percent

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
