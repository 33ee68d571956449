"""`emulate theorems`: each result's oracle calls, counted from real runs, against the paper's count.

For every result and N/M = 1, 2, 4, ... the command runs the emulated forward of a preset with the
paper oracle (float64), counts the small transformer's literal invocations, checks the output
against the monolithic reference, and sets the count beside the paper's construction count:

    Thm 1.1 full     (Lemma 3.1)        2 B^2                    (an A call and a B call per pair)
    Thm 3.5 causal   (Claim B.6)        2 B + 4 B(B-1)/2         (2 per diagonal block, 4 per earlier one)
    Thm 5.1 sliding  (r < M)            4 ceil(N / (M - r))      (one ordinary, one shifted call per chunk)
    Sec. 5 sinks                        6 ceil(N / (M - r))      (plus the sink keys packed beside each chunk)
    Thm 4.1 sampled                     B                        (one B/A call per block)

each times ceil(H/H') L single-head instances (H' = heads packed per call, Lemma 3.3), B = ceil(N/M).
The sampled result is an estimate: its error is against exact full attention.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from emulate.errors import EmulateError

RESULTS = {  # result -> (label, preset, attention)
    "full": ("Thm 1.1 full", "tiny-bert", "full"),
    "causal": ("Thm 3.5 causal", "tiny-llama", "causal"),
    "sampled": ("Thm 4.1 sampled", "tiny-bert", "sampled"),
    "sliding": ("Thm 5.1 sliding", "tiny-llama", "sliding"),
    "sink": ("Sec. 5 sinks", "tiny-llama", "sink"),
}
MAX_INVOCATIONS = 5_000_000  # a sweep past this is a mistake, not a measurement
SLOPE = {"full": 2, "causal": 2, "sampled": 1, "sliding": 1, "sink": 1}


def paper_count(result: str, tokens: int, block: int, window: int | None, heads: int, layers: int, pack: int) -> int:
    """The paper's construction count for one forward (see the module docstring)."""
    B = math.ceil(tokens / block)
    per_instance = {
        "full": 2 * B * B,
        "causal": 2 * B + 4 * (B * (B - 1) // 2),
        "sampled": B,
        "sliding": 4 * math.ceil(tokens / (block - window)) if window else 0,
        "sink": 6 * math.ceil(tokens / (block - window)) if window else 0,
    }[result]
    return per_instance * math.ceil(heads / pack) * layers


def measure(result: str, tokens: int, block: int, window: int | None, sinks: int | None, stable: bool = False,
            pack_heads: int | str = 1, seed: int = 0) -> dict:
    """One verified run of the paper oracle: counted invocations, the paper's count, the error."""
    from emulate.api import run
    from emulate.runtime.oracles import PaperOracle

    label, model_name, attention = RESULTS[result]
    windowed = attention in ("sliding", "sink")
    r = run(model_name, random_tokens=tokens, seed=seed, block_size=block, attention=attention,
                    window=window if windowed else None, sinks=sinks if attention == "sink" else None,
                    dtype="float64", oracle=PaperOracle(stable=stable, pack_heads=pack_heads), verify=True,
                    collect=False)
    s = r.stats
    pack = s["oracle_pack_heads"]
    bound = paper_count(result, tokens, block, window, s["heads"], s["layers"], pack)
    return {"result": result, "label": label, "model": model_name, "tokens": tokens, "block_size": block,
            "n_over_m": tokens / block, "window": window if windowed else None,
            "sinks": sinks if attention == "sink" else None, "pair_calls": s["attention_calls"],
            "invocations": s["oracle_invocations"], "paper_count": bound,
            "ratio": s["oracle_invocations"] / bound if bound else None, "max_rel_err": s["max_rel_err"],
            "by_construction": s["oracle_invocations_by_construction"], "capacity": s["oracle_capacity"],
            "max_rows": s["oracle_max_rows"], "pack_heads": pack, "seconds": s["forward_s"]}


def slopes(rows: list[dict]) -> dict:
    """Slope of log(invocations) against log(N/M) per result between its two largest N (N/M doubles)."""
    out = {}
    for result in dict.fromkeys(r["result"] for r in rows):
        pts = sorted((r["n_over_m"], r["invocations"]) for r in rows if r["result"] == result)
        if len(pts) >= 2:
            (x0, y0), (x1, y1) = pts[-2:]
            out[result] = math.log(y1 / y0) / math.log(x1 / x0)
    return out


def table(rows: list[dict], fitted: dict) -> str:
    lines = ["| result | N | N/M | invocations (measured) | paper's count | ratio | slope, last doubling | max_rel_err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    last = {r["result"]: k for k, r in enumerate(rows)}
    for k, r in enumerate(rows):
        ends = last[r["result"]] == k and r["result"] in fitted
        slope = f"{fitted[r['result']]:.2f} (paper {SLOPE[r['result']]})" if ends else ""
        lines.append(f"| {r['label']} | {r['tokens']} | {r['n_over_m']:g} | {r['invocations']} | {r['paper_count']} | "
                     f"{r['ratio']:.2f} | {slope} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, block: int) -> None:
    """Invocations against N/M on log-log axes, with slope-2 and slope-1 guides; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    xs_all = sorted({r["n_over_m"] for r in rows})
    styles = {"full": ("o", "-"), "causal": ("s", "--"), "sampled": ("^", "-"), "sliding": ("D", "-"), "sink": ("v", "-")}
    for result in dict.fromkeys(r["result"] for r in rows):
        pts = [(r["n_over_m"], r["invocations"]) for r in rows if r["result"] == result]
        marker, line = styles[result]
        ax.plot(*zip(*pts), marker=marker, linestyle=line, fillstyle="none" if result == "causal" else "full",
                label=RESULTS[result][0])
    # guides through half the smallest count, so they run beside the data, not on it
    x = np.array([xs_all[0], xs_all[-1]])
    y0 = 0.5 * min(r["invocations"] for r in rows)
    ax.plot(x, y0 * (x / x[0]) ** 2, "k--", lw=0.8, label="slope 2")
    ax.plot(x, y0 * (x / x[0]), "k:", lw=0.8, label="slope 1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"N / M  (M = {block})")
    ax.set_ylabel("small-transformer invocations (counted)")
    ax.set_title("Oracle calls per forward, measured")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    from emulate.outputs import AtomicOutput

    try:
        with AtomicOutput(path) as out:
            fig.savefig(out.tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def sweep(block_size: int = 32, max_tokens: int = 512, window: int | None = None, sinks: int = 4,
          stable: bool = False, pack_heads: int | str = 1, results: tuple[str, ...] = tuple(RESULTS),
          on_row=None) -> list[dict]:
    """Every result at N = M, 2M, 4M, ... up to max_tokens: one `measure` row each.

    window defaults to M/2 (Thm 5.1 needs r < M); on_row(row) is called as each row is measured.
    """
    M = block_size
    if isinstance(M, bool) or not isinstance(M, int) or M < 2:
        raise EmulateError(f"--block-size must be an integer >= 2, got {M!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < M:
        raise EmulateError(f"--max-tokens must be at least the block size {M}, got {max_tokens!r}")
    window = M // 2 if window is None else window
    if not 1 <= window < M:
        raise EmulateError(f"--window must lie in [1, M) for Thm 5.1's count, got {window}")
    unknown = [r for r in results if r not in RESULTS]
    if unknown or not results:
        raise EmulateError(f"unknown result(s) {', '.join(unknown) or '(none given)'} (choose from {', '.join(RESULTS)})")
    sizes = [M * 2 ** e for e in range(int(math.log2(max_tokens // M)) + 1)]
    # the paper's count for the presets' shape (8 heads, 4 layers, one head per call at worst)
    planned = sum(paper_count(r, n, M, window, 8, 4, 1) for r in results for n in sizes)
    if planned > MAX_INVOCATIONS:
        raise EmulateError(f"--max-tokens {max_tokens} at M = {M} would make about {planned:.2e} small-transformer "
                           f"invocations (at most {MAX_INVOCATIONS:.0e}); lower --max-tokens or raise --block-size")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of calls of M + 1 rows: intra-op threads only add contention
    rows = []
    try:
        for result in results:
            for n in sizes:
                row = measure(result, n, M, window, sinks, stable, pack_heads)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        torch.set_num_threads(threads)
    return rows
