"""Ten million tokens on this machine: the sink-window forward at 1M and 10M tokens, from the CLI
(output streamed to an Arrow file) and from the Python API's `emulate.stream`, each in a fresh
process. Reports forward_s, tokens/s and the process's peak RSS beside the bytes of the token ids
alone, so a peak that grew with N would show.

    .venv/bin/python benchmarks/long_run.py                          # 1M and 10M tokens (about 30 min)
    .venv/bin/python benchmarks/long_run.py --tokens 65536 --quick   # the script itself, in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATE = os.path.join(os.path.dirname(sys.executable), "emulate")
PATTERN = ["--attention", "sink", "--window", "1020", "--sinks", "4", "-M", "2048"]

# the API's row: one pass of emulate.stream, every block's outputs read and dropped
STREAM = """
import json, sys, time
import emulate
from emulate.runtime.memory import peak_rss_mb
n = int(sys.argv[1])
s = emulate.stream("tiny-llama", random_tokens=n, block_size=2048, attention="sink", window=1020, sinks=4)
rows, t0 = 0, time.perf_counter()
for block, out in s:
    rows += out.hidden.shape[0]
wall = time.perf_counter() - t0
assert rows == n
print(json.dumps({"forward_s": s.stats["forward_s"], "tokens_per_s": n / wall, "peak_rss_mb": peak_rss_mb(),
                  "perplexity": s.stats["perplexity"], "threads": s.stats["threads"]}))
"""


def cli_row(n: int, out: str) -> dict:
    cmd = [EMULATE, "run", "--random-tokens", str(n), *PATTERN, "--output", out, "--json", "--quiet"]
    stats = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"forward_s": stats["forward_s"], "tokens_per_s": stats["tokens_per_s"],
            "peak_rss_mb": stats["peak_rss_mb"], "perplexity": stats["perplexity"], "threads": stats["threads"],
            "output_mb": os.path.getsize(out) / 2**20}


def stream_row(n: int) -> dict:
    done = subprocess.run([sys.executable, "-c", STREAM, str(n)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1048576,10485760")
    ap.add_argument("--quick", action="store_true", help="the CLI row only")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    print("| N | entry | forward_s | tokens/s | peak RSS (MB) | token ids (MB) | perplexity |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.tokens.split(",")):
            rows = [("emulate run --output", lambda: cli_row(n, os.path.join(tmp, "out.arrow")))]
            if not args.quick:
                rows.append(("emulate.stream", lambda: stream_row(n)))
            for name, row in rows:
                r = row()
                print(f"| {n:,} | {name} | {r['forward_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:.0f} "
                      f"| {8 * n / 2**20:.0f} | {r['perplexity']:.2f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
