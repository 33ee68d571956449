"""The job side of `emulate submit` (cluster/jobs.py): runs `emulate ARGS...` and marks each line
it writes on stdout in the job's log.

Ray keeps one log per job, where its own lines ("Running entrypoint for job ...", the runtime
environment's set-up) and the command's stdout and stderr all land
(ray/dashboard/modules/job/job_supervisor.py opens the command with stderr=STDOUT into that
file). Marked lines are the run's stdout: `submit` gives them back on its stdout, unmarked, and
everything else on its stderr, so `emulate submit -- run --json | jq` reads the JSON alone.

    python -m cluster.job_entry run --random-tokens 16384 --json

The run is a child process (its stdout a pipe, its stderr the log as it is); a stop signal Ray
sends this process is passed on to it, and this process exits with its status (128 + a signal
that ended it).
"""
from __future__ import annotations

import signal
import subprocess
import sys

MARK = "[emulate:stdout] "  # a line of the run's stdout
MARK_NO_NEWLINE = "[emulate:stdout-] "  # the run's last stdout line, which had no newline


def main(argv: list[str]) -> int:
    child = subprocess.Popen([sys.executable, "-m", "emulate.cli", *argv], stdout=subprocess.PIPE)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except OSError:  # already gone
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    out = sys.stdout.buffer
    for line in child.stdout:
        ended = line.endswith(b"\n")
        out.write((MARK if ended else MARK_NO_NEWLINE).encode() + line + (b"" if ended else b"\n"))
        out.flush()
    code = child.wait()
    return 128 - code if code < 0 else code


def split(line: str) -> tuple[bool, str]:
    """(True, the run's own text) for a marked line of the job's log; (False, the line) otherwise."""
    if line.startswith(MARK):
        return True, line[len(MARK):]
    if line.startswith(MARK_NO_NEWLINE):
        return True, line[len(MARK_NO_NEWLINE):].rstrip("\n")
    return False, line


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
