"""emulate: a long-context transformer forward as a task graph of small transformers (at most M tokens each).

    import emulate
    run = emulate.run("tiny-llama", tokens, block_size=256, attention="causal", dtype="float64", verify=True)
    run.hidden, run.logprobs, run.stats, run.graph

    emulate.compile(model, tokens=N, block_size=M)   # the logical task graph, nothing runs
    emulate.monolithic(model, tokens)                # the monolithic forward every run is checked against
    emulate.stream(model, tokens, block_size=M)      # (block, BlockOutput) in block order, memory bounded
    emulate.run(model, tokens, executor=emulate.Ray(workers=2))
    emulate.run(model, tokens, oracle=emulate.PaperOracle(stable=True, pack_heads=8))
    emulate.draw(graph, "g.svg"); emulate.draw_coverage(graph, "pairs.png"); emulate.draw_trace("t.json", "gantt.png")

docs/design.md explains the parts; emulate/api.py holds the run loop.
"""
from importlib.metadata import PackageNotFoundError, version

from emulate.api import BlockOutput, Problem, Run, Stream, compile, monolithic, prepare, run, stream, tolerance_for
from emulate.config import EmulateError, ModelConfig
from emulate.executor import Execution, Executor, Local, Ray
from emulate.forward import row_errors
from emulate.loaders import Model, load
from emulate.oracles import AttentionOracle, KernelOracle, PairCall, PaperOracle
from emulate.pictures import draw, draw_comparison, draw_coverage, draw_trace
from emulate.presets import PRESETS

try:
    __version__ = version("emulate")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "PRESETS", "AttentionOracle", "BlockOutput", "EmulateError", "Execution", "Executor", "KernelOracle", "Local",
    "Model", "ModelConfig", "PairCall", "PaperOracle", "Problem", "Ray", "Run", "Stream", "compile", "draw",
    "draw_comparison", "draw_coverage", "draw_trace", "load",
    "monolithic", "prepare", "row_errors", "run", "stream", "tolerance_for", "__version__",
]
