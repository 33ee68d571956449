"""`emulate submit`: run `emulate run ...` on a Ray cluster as a job, through the Ray Jobs API.

Follows the job's logs and exits with the job's status (0 when it succeeded): the run's own
stdout on stdout, nothing else (the job runs under cluster/job_entry.py, which marks its stdout
lines), and Ray's lines, the run's stderr and submit's own (the job id, the final status) on
stderr; with --no-wait, the job id on stdout. Without --address (or $RAY_API_SERVER_ADDRESS, an
http $RAY_ADDRESS) the job goes to the cluster `emulate cluster up` recorded (cluster/state.py),
else to the default job server address. Ray's token authentication stays on: the token is read where Ray keeps it
($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and sent with every request; with
no token the command stops with one line rather than trying without. A job server that is up
but has no job agent yet (a cluster just started or busy: Ray answers "No available agent to
submit job") is asked again every 2 s for up to SUBMIT_RETRY_S (60 s), then it is one line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from emulate.errors import EmulateError, error_line

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PATH_OPTIONS = ("--input", "--output", "-o", "--trace", "--model")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SUBMIT_RETRY_S = 60.0  # how long a transient "No available agent" refusal is retried
TRANSIENT = ("No available agent",)


def job_server(address: str | None) -> str:
    """The job server's URL: --address, then $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, the
    cluster `emulate cluster up` recorded, the default."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
        if candidate and candidate is address:
            raise EmulateError(f"--address for submit is the job server's URL, like {DEFAULT_ADDRESS}; got {address!r}")
    from cluster.local import job_server as recorded

    return recorded() or DEFAULT_ADDRESS


def auth_headers() -> dict:
    """The Authorization header for Ray's token authentication; a missing token is an error."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise EmulateError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: emulate submit keeps Ray's token "
                           "authentication on; unset RAY_AUTH_MODE or set it to token")
    from cluster.session import find_token, token_path

    token = find_token()  # the token file may have appeared since this process started
    if token is None:
        raise EmulateError(f"no Ray authentication token (looked in $RAY_AUTH_TOKEN and {token_path()}); copy the "
                           "cluster's token there (`ray get-auth-token` on the head prints it)")
    return {"Authorization": f"Bearer {token}"}


def entrypoint(run_args: list[str], local: bool) -> str:
    """The job's shell command. On a cluster on this machine, paths become absolute and the
    interpreter is this one; elsewhere the cluster's own `python` must have emulate installed."""
    args = list(run_args)
    if local:
        for k, a in enumerate(args[:-1]):
            if a in PATH_OPTIONS and not (a == "--model" and not Path(args[k + 1]).exists()):
                args[k + 1] = str(Path(args[k + 1]).resolve())
        python = sys.executable
    else:
        python = "python"
    return " ".join(shlex.quote(x) for x in [python, "-m", "cluster.job_entry", *args])


def submit(run_args: list[str], address: str | None = None, wait: bool = True) -> int:
    """Submit `emulate run ...` as a job; follow its logs unless wait is False. The job's exit status.

    "No available agent to submit job" (the head's job agent not registered yet) is retried every
    2 s for up to SUBMIT_RETRY_S = 60 s; any other refusal, or that one after 60 s, is one line.
    """
    run_args = list(run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    if run_args[:1] != ["run"]:
        raise EmulateError("usage: emulate submit [--address URL] -- run <run options>")
    if "--executor" not in run_args:
        run_args += ["--executor", "ray"]
    url = job_server(address)
    headers = auth_headers()
    local = (urlparse(url).hostname or "") in LOCAL_HOSTS
    from ray.job_submission import JobStatus, JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # no INFO line per request

    try:
        client = JobSubmissionClient(url, headers=headers)
    except Exception as err:  # noqa: BLE001 - connection, auth and version errors all end here
        raise EmulateError(f"cannot reach the Ray job server at {url}: {error_line(err)}") from None
    job_id = _submit_with_retry(client, url, entrypoint(run_args, local))
    print(f"emulate: job {job_id} submitted to {url}", file=sys.stderr, flush=True)
    if not wait:
        print(job_id, flush=True)
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt as err:
        print(f"emulate: stopped following job {job_id}; it keeps running (ray job stop {job_id})", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    status = client.get_job_status(job_id)
    print(f"emulate: job {job_id} {status.value.lower()}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit_with_retry(client, url: str, command: str, retry_s: float = SUBMIT_RETRY_S) -> str:
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(entrypoint=command)
        except Exception as err:  # noqa: BLE001
            transient = any(t in str(err) for t in TRANSIENT)
            if transient and time.monotonic() + 2.0 < deadline:
                time.sleep(2.0)
                continue
            waited = f" (still so after retrying for {retry_s:g} s)" if transient else ""
            raise EmulateError(f"the job server at {url} refused the job: {_reason(err)}{waited}") from None


def _reason(err: BaseException) -> str:
    """The line of Ray's error that says why: its HTTP error's text, not the request's repr."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    for t in TRANSIENT:
        for line in lines:
            if t in line:
                return line
    return error_line(err)


async def _follow(client, job_id: str) -> None:
    """The job's log as it grows: the run's stdout lines (marked by cluster/job_entry.py) on stdout,
    every other line on stderr. A line cut between two chunks waits for its end."""
    from cluster.job_entry import split

    pending = ""
    async for text in client.tail_job_logs(job_id):
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            _route(split(line + "\n"))
    if pending:
        _route(split(pending))


def _route(part: tuple[bool, str]) -> None:
    ours, text = part
    stream = sys.stdout if ours else sys.stderr
    stream.write(text)
    stream.flush()
