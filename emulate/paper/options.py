"""The CLI's oracle options (`emulate run --oracle ... --pack-heads`) and the `emulate theorems` command.

Kept here so that emulate/cli.py only registers them; nothing in this module imports torch.
"""
from __future__ import annotations

import argparse

from emulate.config import EmulateError

ORACLES = ("kernel", "paper", "paper-stable")


def add_oracle_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("oracle: what runs each pair call")
    g.add_argument("--oracle", choices=ORACLES, default="kernel",
                   help="kernel: block attention returning (output, lse) (default); paper: the paper's literal "
                        "constructions on a small transformer of capacity M+1 (Lemma 3.1, Claim B.6, Thm 3.5, "
                        "Thm 5.1, Sec. 5, Thm 4.1); paper-stable: the same calls with the A call's scores shifted "
                        "by a norm bound, exact for much larger scores")
    g.add_argument("--pack-heads", type=int, nargs="?", const=0, default=None, metavar="H'",
                   help="Lemma 3.3: run H' single-head instances side by side in one call (no value: all heads)")


def make_oracle(args, graph):
    """The oracle object NodeRunner takes, or None for the kernel oracle."""
    oracle = getattr(args, "oracle", "kernel")
    pack = getattr(args, "pack_heads", None)
    if oracle == "kernel":
        if pack is not None:
            raise EmulateError("--pack-heads packs the paper oracle's calls; add --oracle paper")
        return None
    if pack is not None and pack < 0:
        raise EmulateError(f"--pack-heads must be >= 1 (or given without a value for all heads), got {pack}")
    if getattr(args, "executor", "local") != "local":
        raise EmulateError(f"--oracle {oracle} runs on the local executor only (its invocation counts live in-process)")
    from emulate.paper.oracle import PaperOracle

    spec = graph.graph["spec"]
    pack_heads = 1 if pack is None else (spec["heads"] if pack == 0 else pack)
    return PaperOracle(spec["block_size"], stable=oracle == "paper-stable", pack_heads=pack_heads)


def oracle_summary(oracle) -> dict:
    """Extra JSON keys for a run: literal small-transformer invocations, capacity, per construction."""
    return {} if oracle is None else oracle.summary()


def add_theorems_command(sub) -> None:
    t = sub.add_parser("theorems", help="measure each theorem's oracle calls and error against N/M (paper oracle)")
    t.add_argument("--max-tokens", type=int, default=512, metavar="N", help="largest N (default 512)")
    t.add_argument("--block-size", "-M", type=int, default=32, help="M (default 32)")
    t.add_argument("--window", type=int, default=None, help="sliding window r (default M/2)")
    t.add_argument("--sinks", type=int, default=4, help="sink tokens s (default 4)")
    t.add_argument("--oracle", choices=ORACLES[1:], default="paper")
    t.add_argument("--pack-heads", type=int, nargs="?", const=0, default=None, metavar="H'",
                   help="Lemma 3.3: H' single-head instances per call (no value: all heads)")
    t.add_argument("--results", default="full,causal,sampled,sliding,sink",
                   help="comma-separated subset of full,causal,sampled,sliding,sink")
    t.add_argument("--plot", metavar="FILE.png", default=None, help="log-log plot of invocations against N/M")
    t.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    t.set_defaults(handler=_theorems)


def _theorems(args) -> int:
    from emulate.paper.theorems import cmd_theorems

    return cmd_theorems(args)
