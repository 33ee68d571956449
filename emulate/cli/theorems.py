"""`emulate theorems`: each result of the paper run with the paper oracle at N = M, 2M, 4M, ..., its
small-transformer invocations set beside the paper's count (the sweep is emulate/paper/theorems.py)."""
from __future__ import annotations

import json
import sys

from emulate.cli.options import add_quiet_option, pack_width
from emulate.cli.parser import Help


def add_theorems_command(sub) -> None:
    t = sub.add_parser("theorems", formatter_class=Help,
                       help="measure each theorem's oracle calls and error against N/M (paper oracle)",
                       description="Run each result of the paper with the paper oracle (float64) at N = M, 2M, 4M, "
                                   "..., count the small transformer's invocations and set them beside the paper's count.",
                       epilog="examples:\n  emulate theorems\n  emulate theorems --max-tokens 1024 --results causal,sliding "
                              "--plot calls.png")
    t.add_argument("--max-tokens", type=int, default=512, metavar="N", help="largest N")
    t.add_argument("--block-size", "-M", type=int, default=32, help="M")
    t.add_argument("--window", type=int, default=None, help="sliding window r (default M/2)")
    t.add_argument("--sinks", type=int, default=4, help="sink tokens s")
    t.add_argument("--oracle", choices=("paper", "paper-stable"), default="paper", help="which paper oracle")
    t.add_argument("--pack-heads", type=pack_width, nargs="?", const="all", default=1, metavar="H'",
                   help="Lemma 3.3: H' single-head instances per call (no value: all heads)")
    t.add_argument("--results", default="full,causal,sampled,sliding,sink",
                   help="comma-separated subset of full,causal,sampled,sliding,sink")
    t.add_argument("--plot", metavar="FILE.png", default=None, help="log-log plot of invocations against N/M")
    t.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    add_quiet_option(t)
    t.set_defaults(handler=cmd_theorems)


def cmd_theorems(args) -> int:
    from emulate.outputs import output_target
    from emulate.paper.theorems import plot, slopes, sweep, table

    if args.plot:
        output_target(args.plot)  # refused before the runs

    def report(row):  # progress on stderr, whatever stdout carries
        if not args.quiet:
            print(f"  {row['label']:<16} N = {row['tokens']:>6}: {row['invocations']:>7} invocations, "
                  f"max_rel_err {row['max_rel_err']:.1e} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)

    results = tuple(r.strip() for r in args.results.split(",") if r.strip())
    rows = sweep(args.block_size, args.max_tokens, args.window, args.sinks, args.oracle == "paper-stable",
                 args.pack_heads, results, on_row=report)
    window = args.block_size // 2 if args.window is None else args.window
    fitted = slopes(rows)
    if args.plot:
        plot(rows, args.plot, args.block_size)
    if args.json:
        print(json.dumps({"block_size": args.block_size, "window": window, "sinks": args.sinks, "oracle": args.oracle,
                          "rows": rows, "slopes": fitted}))
    else:
        print(f"paper oracle ({args.oracle}), float64, M = {args.block_size}, window r = {window}, sinks s = "
              f"{args.sinks}; capacity M+1 = {args.block_size + 1}")
        print(table(rows, fitted))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
