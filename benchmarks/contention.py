"""forward_s on a shared machine: emulate's thread policies against transformers, with and without a busy neighbour.

The same seeded Llama checkpoint as benchmarks/vs_transformers.py (width 256, 4 layers, 8 heads,
2 KV heads), N tokens of exact causal attention in blocks of M. Each row is timed in this one
process, first on the machine as it is, then with one other CPU-bound process running (a Python
busy loop, started here and killed at the end): transformers' forward (sdpa) on torch's default
threads; emulate's local run with --threads auto, 1 and the machine's core count (call workers of
one torch thread each); and, for comparison, the calls run in turn with the machine's core count
as torch intra-op threads (what the local executor did before it had call workers). Both sides get
the same warm-up (one forward of the first 2048 tokens each) before anything is timed. Each figure
is the median of --repeat runs; the ratios are to transformers in the same condition.

    .venv/bin/python benchmarks/contention.py --tokens 16384 --block-size 1024
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_transformers import build_checkpoint  # noqa: E402

import emulate  # noqa: E402
import emulate.runtime.threads  # noqa: E402
from emulate.runtime.threads import cores  # noqa: E402


@contextlib.contextmanager
def calls_in_turn():
    """The local executor without call workers: its nodes in turn, `threads` as torch intra-op threads."""
    saved = emulate.runtime.threads.worker_count
    emulate.runtime.threads.worker_count = lambda threads: 1
    try:
        yield
    finally:
        emulate.runtime.threads.worker_count = saved


def transformers_forward(model, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(tokens[None], use_cache=False)
    return time.perf_counter() - t0


def measure(hf_model, em_model, tokens, block_size: int, repeat: int) -> dict:
    rows: dict[str, list[float]] = {}
    threads_seen: dict[str, list] = {}
    policies = {"--threads auto": ("auto", False), "--threads 1": (1, False), f"--threads {cores()}": (cores(), False),
                f"calls in turn, {cores()} intra-op threads": (cores(), True)}
    for _ in range(repeat):  # interleaved, so a change in the machine's load hits every row alike
        rows.setdefault("transformers (sdpa)", []).append(transformers_forward(hf_model, tokens))
        for name, (threads, in_turn) in policies.items():
            with calls_in_turn() if in_turn else contextlib.nullcontext():
                run = emulate.run(em_model, tokens, block_size=block_size, threads=threads)
            rows.setdefault(f"emulate, {name}", []).append(run.stats["forward_s"])
            threads_seen.setdefault(f"emulate, {name}", []).extend(run.stats["threads"])
    return {name: (statistics.median(times), sorted(set(threads_seen.get(name, [torch.get_num_threads()]))))
            for name, times in rows.items()}


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tokens = torch.randint(0, 1024, (args.tokens,), generator=torch.Generator().manual_seed(0))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "unknown"
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint("llama", path, 0)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                                     dtype=torch.float32).eval()
        em_model = emulate.load(path)
        # warm-up, the same on both sides: one forward of the first 2048 tokens each (modules built, the
        # allocator and thread pools primed) before anything is timed
        transformers_forward(hf_model, tokens[:2048])
        emulate.run(em_model, tokens[:2048], block_size=args.block_size)
        results = {"idle": measure(hf_model, em_model, tokens, args.block_size, args.repeat)}
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)
            results["one busy process"] = measure(hf_model, em_model, tokens, args.block_size, args.repeat)
        finally:
            busy.kill()
            busy.wait()
    print(f"N = {args.tokens}, M = {args.block_size}, causal, float32, {cores()} cores, torch default threads "
          f"{torch.get_num_threads()}, median of {args.repeat}; load average before: {load}\n")
    print("| machine | run | threads used | forward_s | / transformers |")
    print("| --- | --- | --- | --- | --- |")
    for condition, rows in results.items():
        base = rows["transformers (sdpa)"][0]
        for name, (seconds, used) in rows.items():
            print(f"| {condition} | {name} | {', '.join(map(str, used))} | {seconds:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
