"""The library's entry points: `compile`, `stream`, `run` and `monolithic`, each keyword spelt out once here.

    model, tokens, options --prepare--> Problem (emulate/problem.py) --compile--> logical graph
    Problem + executor + oracle --backend--> BlockOutputs (emulate/runtime/graph_backend.py,
                                             emulate/hf/backend.py)
    backend --Stream--> (block, BlockOutput) in block order --finish--> Run (emulate/runtime/loop.py)

Executors and oracles are named from their registries (emulate/runtime/registry.py) or passed as
objects; nothing here knows which one it holds. Every bad argument raises EmulateError with the one
line the CLI prints (emulate/cli/ parses options, calls this module, and prints). The numerics
contract that `verify` checks is docs/numerics.md's.
"""
from __future__ import annotations

import difflib
import inspect
import time
from typing import TYPE_CHECKING, Any

from emulate.errors import EmulateError, OptionError

if TYPE_CHECKING:
    import networkx as nx

    from emulate.problem import StageProgress
    from emulate.runtime.loop import Run, Stream
    from graphs import CompactGraph

BACKENDS = ("graph", "transformers")


def compile(model=None, tokens=None, progress: StageProgress | None = None, *, compact: bool = False,
            text: str | None = None, input: str | None = None, random_tokens: int | None = None, seed: int = 0,
            block_size: int = 256, attention="auto", window: int | None = None, sinks: int | None = None,
            dtype="float32", **unknown) -> nx.DiGraph | CompactGraph:
    """The logical task graph of one forward; nothing runs. `tokens` may be a count (an int).

    The problem keywords are `run`'s (dtype prices the graph's bytes). progress("graph", done,
    total) per layer. compact=True gives a graphs.CompactGraph instead of networkx: one template per
    layer pattern, analysed without materialising a node (`.counts()`), nodes generated on demand
    (`.iter_nodes()`, `.to_networkx()`); it compiles a 1M-token forward in well under a second.
    `model` may also be a published shape (emulate.models.shapes.SHAPES, e.g. "llama3-8b"): its
    widths, no weights.
    """
    from emulate.problem import prepare, shape_or_model

    _refuse_unknown("compile", unknown)
    problem = prepare(shape_or_model(model), tokens, count_only=True, graph_form="compact" if compact else "networkx",
                      text=text, input=input, random_tokens=random_tokens, seed=seed, block_size=block_size,
                      attention=attention, window=window, sinks=sinks, dtype=dtype)
    return problem.compact_graph(progress) if compact else problem.graph(progress)


def stream(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
           random_tokens: int | None = None, seed: int = 0, block_size: int = 256, attention="auto",
           window: int | None = None, sinks: int | None = None, dtype="float32", device: str = "cpu",
           executor: Any = None, oracle: Any = "kernel", pack_heads: int | str | None = None,
           address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
           gpus_per_worker: float | None = None, trace: str | None = None, stall_timeout: float | None = None,
           placement: str | None = None, worker_memory: int | None = None, grid: str | None = None, threads: int | str | None = None, backend: str = "graph", progress: StageProgress | None = None,
           **unknown) -> Stream:
    """Compile and start one forward; iterate the result for (block, BlockOutput) in block order.

    The keywords are `run`'s, less those that need every block at once (output, hidden, verify,
    tolerance, collect): see `run` for each.
    """
    _refuse_unknown("stream", unknown)
    return _stream(model, tokens, text=text, input=input, random_tokens=random_tokens, seed=seed,
                   block_size=block_size, attention=attention, window=window, sinks=sinks, dtype=dtype, device=device,
                   executor=executor, oracle=oracle, pack_heads=pack_heads, address=address, workers=workers,
                   cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, trace=trace,
                   stall_timeout=stall_timeout, placement=placement, worker_memory=worker_memory, grid=grid, threads=threads, backend=backend, progress=progress)


def run(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
        random_tokens: int | None = None, seed: int = 0, block_size: int = 256, attention="auto",
        window: int | None = None, sinks: int | None = None, dtype="float32", device: str = "cpu",
        executor: Any = None, oracle: Any = "kernel", pack_heads: int | str | None = None,
        address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
        gpus_per_worker: float | None = None, trace: str | None = None, stall_timeout: float | None = None,
        placement: str | None = None, worker_memory: int | None = None, grid: str | None = None, threads: int | str | None = None, backend: str = "graph", progress: StageProgress | None = None,
        output: str | None = None, hidden: bool = False, verify: bool = False, tolerance: float | None = None,
        collect: bool = True, **unknown) -> Run:
    """Run one emulated forward end to end, in-process or on any registered executor.

    model: a preset name, a checkpoint directory, a .gguf file or an emulate.Model (default:
    smollm2-135m for text or no input, tiny-llama for token ids).
    tokens: 1-d integer ids (array, tensor or list); or text=, input= (a file), random_tokens=N;
    with none of them, the model's default input: the embedded English text for a model with a
    tokenizer, seeded random ids otherwise. seed: for random ids and the sampled pattern.
    block_size: M, the most tokens any call sees. attention: auto (the model's own mask), full,
    causal, sliding, sink or sampled, a graphs.Pattern, or one Pattern per layer; window r and
    sinks s for the names that take them. dtype: float32, float64, bfloat16 or float16 (16-bit weights,
    activations and pair calls; partials and merges in float32; docs/numerics.md). device: cpu or cuda.
    executor: a registered name ("local", the default; "ray"; emulate.register_executor adds
    more) or an object with `name` and `start` (emulate.Executor). Named executors take their
    options here: address, workers, cpus_per_worker, gpus_per_worker, stall_timeout, placement
    ("sequence", "layers", "grid" or "auto"), grid ("2x2") and worker_memory (bytes per worker) (Ray's: cluster/options.py),
    threads (the local executor's call workers on CPU: an integer, or "auto") and trace (the
    executed schedule as Chrome trace-event JSON, either).
    oracle: a registered name ("kernel", "paper", "paper-stable"; emulate.register_oracle adds
    more) or an object with `name` and `bind` (emulate.AttentionOracle); pack_heads with a named
    paper oracle. progress(stage, done, total) reports the stages "graph" (layers built),
    "forward" (calls or Ray tasks done) and "reference" (layers of verify's pass).
    backend: "graph" runs the task graph (emulate's own blocks); "transformers" runs a
    checkpoint's own transformers model with every attention call cut into pair calls
    (emulate/hf/backend.py); verify then compares with the same model under sdpa.
    output: an Arrow IPC file written block by block (hidden states added with hidden=True, and
    always for encoders). verify: also run the reference forward and check the error against the
    tolerance of the mode (docs/numerics.md) or `tolerance`. collect=False keeps no outputs in
    memory (run.hidden and run.logprobs are None; verify collects what it needs).
    """
    from emulate.outputs import check_distinct, output_target
    from emulate.runtime.loop import finish
    from emulate.runtime.verify import check_tolerance

    _refuse_unknown("run", unknown)
    t_start = time.perf_counter()
    check_distinct(input=input, output=output, trace=trace)
    if output is not None:
        output_target(output)  # a path that cannot be written is refused before any work
    check_tolerance(tolerance)
    s = _stream(model, tokens, text=text, input=input, random_tokens=random_tokens, seed=seed, block_size=block_size,
                attention=attention, window=window, sinks=sinks, dtype=dtype, device=device, executor=executor,
                oracle=oracle, pack_heads=pack_heads, address=address, workers=workers,
                cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, trace=trace,
                stall_timeout=stall_timeout, placement=placement, worker_memory=worker_memory, grid=grid, threads=threads, backend=backend, progress=progress,
                collect=collect, verify=verify)
    return finish(s, output=output, hidden=hidden, verify=verify, tolerance=tolerance, collect=collect,
                  progress=progress, t_start=t_start)


def monolithic(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
               random_tokens: int | None = None, seed: int = 0, attention="auto", window: int | None = None,
               sinks: int | None = None, dtype="float32", device: str = "cpu", **unknown) -> Run:
    """The monolithic forward (emulate/models/reference.py): one full-length pass, what every run is checked against.

    Takes `run`'s problem keywords; returns a Run whose graph is None (no graph ran) and whose stats
    hold reference_s. The sampled pattern's reference is exact full attention.
    """
    from emulate.problem import check_device, prepare
    from emulate.runtime.graph_backend import monolithic_reference
    from emulate.runtime.loop import Run

    _refuse_unknown("monolithic", unknown)
    check_device(device)
    p = prepare(model, tokens, text=text, input=input, random_tokens=random_tokens, seed=seed, attention=attention,
                window=window, sinks=sinks, dtype=dtype)
    ref = monolithic_reference(p, device)
    return Run(ref.hidden, ref.logprobs, ref.stats, None, p.tokens)


def _stream(model, tokens, *, backend: str, executor, oracle, pack_heads, device: str, progress,
            collect: bool = True, verify: bool = False, **options) -> Stream:
    """The one path from keywords to a Stream, for every backend."""
    from emulate.problem import check_device
    from emulate.runtime.loop import Stream

    if backend not in BACKENDS:
        raise EmulateError(f"backend must be {' or '.join(BACKENDS)}, got {backend!r}")
    check_device(device)
    if backend == "transformers":
        from emulate.hf.backend import TransformersBackend

        return Stream(TransformersBackend.prepare(model, tokens, executor=executor, oracle=oracle,
                                                  pack_heads=pack_heads, device=device, progress=progress, **options))
    return Stream(_graph_backend(model, tokens, executor, oracle, pack_heads, device, progress, collect, verify,
                                 **options))


EXECUTOR_OPTIONS = ("address", "workers", "cpus_per_worker", "gpus_per_worker", "stall_timeout", "trace", "threads",
                    "placement", "worker_memory", "grid")


def _graph_backend(model, tokens, executor, oracle, pack_heads, device, progress, collect, verify, **options):
    from emulate.problem import prepare
    from emulate.runtime.contract import check_oracle_dtype
    from emulate.runtime.graph_backend import GraphBackend
    from emulate.runtime.memory import check_fits, estimate
    from emulate.runtime.registry import EXECUTORS, ORACLES

    executor_options = {k: options.pop(k) for k in EXECUTOR_OPTIONS}
    ex = EXECUTORS.resolve("local" if executor is None else executor, executor_options)
    form = getattr(ex, "graph_form", "compact")
    chosen = ORACLES.resolve(oracle, {"pack_heads": pack_heads})
    p = prepare(model, tokens, graph_form=form, **options)
    config = p.model.config
    chosen.bind(p.block_size, config.heads)  # an oracle refuses what it cannot run before any work
    check_oracle_dtype(chosen, p.dtype)
    check_fits(estimate(config, p.length, p.block_size, p.patterns, p.dtype.itemsize, collect, verify, graph=form),
               f"{p.length} tokens at M = {p.block_size}" + (" with verify" if verify else ""))
    return GraphBackend(p, p.compact_graph(progress), ex, chosen, device, progress)


def _refuse_unknown(function: str, unknown: dict) -> None:
    """A misspelt keyword: one line naming emulate.<function> and the closest valid keyword (read off
    the function's own signature, so the list cannot drift from it)."""
    if unknown:
        valid = [k for k in inspect.signature(globals()[function]).parameters if k != "unknown"]
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (it takes {', '.join(valid)})"
        raise OptionError(f"emulate.{function}() got an unexpected keyword argument {name!r}{hint}")
