"""The CLI's Ray commands: `emulate submit` (a run as a Ray job, cluster/jobs.py) and `emulate
cluster up|down|status` (a local multi-node Ray cluster, cluster/local.py).

They live here, not in emulate/cli/, because emulate never imports the cluster package: the
top-level parser (emulate/cli/program.py, COMMANDS) names these functions by string and resolves
them with importlib when it is built. Ray itself is imported only when one of them runs.
"""
from __future__ import annotations

import argparse
import json
import sys

from emulate.cli.parser import Help

DEFAULT_PORT = 6380  # `cluster up`'s GCS port


def add_submit_command(sub) -> None:
    submit = sub.add_parser("submit", formatter_class=Help,
                            help="submit `emulate run ...` to a Ray cluster as a job (Ray Jobs API)",
                            description="Submit `emulate run ...` as a Ray job, follow its logs and exit with its "
                                        "status. A job server that is still starting its agent (\"No available "
                                        "agent\") is retried for up to 60 s.",
                            epilog="example:\n  emulate submit -- run --random-tokens 16384 -M 1024 --json")
    submit.add_argument("--address", default=None, help="the job server (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                        "the cluster `emulate cluster up` started, or http://127.0.0.1:8265)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without following the logs")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- run <run options>")
    submit.set_defaults(handler=cmd_submit)


def cmd_submit(args) -> int:
    from cluster.jobs import submit  # lazy: Ray is imported only for Ray commands

    return submit(args.entrypoint, args.address, wait=not args.no_wait)


def add_cluster_command(sub) -> None:
    cluster = sub.add_parser("cluster", formatter_class=Help,
                             help="start or stop a local multi-node Ray cluster on this machine",
                             description="up: a head and K worker nodes on 127.0.0.1 with token authentication; "
                                         "returns once the Jobs API runs a job (at most 120 s), and stops "
                                         "everything it started when it fails. down: stops exactly that cluster. "
                                         "status: prints its state.",
                             epilog="example:\n  emulate cluster up --worker-nodes 2 && emulate submit -- run --json; "
                                    "emulate cluster down")
    cluster.add_argument("action", choices=("up", "down", "status"))
    cluster.add_argument("--worker-nodes", type=int, default=2, help="nodes besides the head")
    cluster.add_argument("--cpus-per-node", type=float, default=None, help="CPUs each node offers (default: this machine's)")
    cluster.add_argument("--port", type=int, default=None, help="the head's GCS port (up: default 6380; down and "
                         "status: the cluster started with it, needed when several are up)")
    cluster.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server port on 127.0.0.1")
    cluster.set_defaults(handler=cmd_cluster)


def cmd_cluster(args) -> int:
    from cluster import local

    if args.action == "down":
        return local.down(args.port)
    if args.action == "status":
        record = local.status(args.port)
        if record is None:
            print("no local cluster is up", file=sys.stderr)
            return 1
        print(json.dumps(record.summary()))
        return 0
    port = args.port if args.port is not None else DEFAULT_PORT
    record = local.up(args.worker_nodes, args.cpus_per_node, port, args.dashboard_port)
    print(f"local Ray cluster up: head + {record.worker_nodes} worker node(s), {record.cpus_per_node:g} CPU each\n"
          f"  run on it:    emulate run --executor ray --address {record.address} ...\n"
          f"  submit a job: emulate submit -- run ...   (or --address {record.dashboard})\n"
          f"  stop it:      emulate cluster down --port {record.port}", file=sys.stderr)
    print(json.dumps(record.summary()))
    return 0
