"""emulate: a long-context transformer forward as a task graph of small transformers (at most M tokens each).

    import emulate
    run = emulate.run("tiny-llama", tokens, block_size=256, attention="causal", dtype="float64", verify=True)
    run.hidden, run.logprobs, run.stats, run.graph

    emulate.compile(model, tokens=N, block_size=M)   # the logical task graph, nothing runs
    emulate.monolithic(model, tokens)                # the monolithic forward every run is checked against
    emulate.generate(model, prompt, max_new_tokens=16, block_size=M)  # decode on the block KV cache
    emulate.generate_iter(model, prompt, ...)        # the same, yielding each Token as it comes
    emulate.stream(model, tokens, block_size=M)      # (block, BlockOutput) in block order, memory bounded
    emulate.run(model, tokens, executor="ray", workers=2)
    emulate.run(model, tokens, oracle=emulate.PaperOracle(stable=True, pack_heads=8))
    emulate.register_oracle("mine", MyOracle)        # then oracle="mine", or --oracle mine
    emulate.draw(graph, "g.svg"); emulate.draw_coverage(graph, "pairs.png"); emulate.draw_trace("t.json", "gantt.png")

docs/design.md explains the parts; docs/extending.md adds an oracle, an executor, a pattern or a model.
The names below are imported on first use: `import emulate` loads neither torch, Ray nor transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "run": "emulate.api", "stream": "emulate.api", "compile": "emulate.api", "monolithic": "emulate.api",
    "generate": "emulate.generation", "generate_iter": "emulate.generation", "Generation": "emulate.generation",
    "Token": "emulate.generation", "GenerationStream": "emulate.generation",
    "prepare": "emulate.problem", "Problem": "emulate.problem",
    "Run": "emulate.runtime.loop", "Stream": "emulate.runtime.loop",
    "BlockOutput": "emulate.runtime.contract", "AttentionOracle": "emulate.runtime.contract",
    "BoundOracle": "emulate.runtime.contract", "CallCounts": "emulate.runtime.contract",
    "Execution": "emulate.runtime.contract", "Executor": "emulate.runtime.contract", "Job": "emulate.runtime.contract",
    "PairCall": "emulate.runtime.contract",
    "register_oracle": "emulate.runtime.registry", "register_executor": "emulate.runtime.registry",
    "KernelOracle": "emulate.runtime.oracles", "PaperOracle": "emulate.runtime.oracles",
    "Local": "emulate.runtime.local", "NodeRunner": "emulate.runtime.runner",
    "tolerance_for": "emulate.runtime.verify", "row_errors": "emulate.runtime.verify",
    "EmulateError": "emulate.errors", "OptionError": "emulate.errors",
    "ModelConfig": "emulate.models.config", "Model": "emulate.models.loaders", "load": "emulate.models.loaders",
    "PRESETS": "emulate.models.presets",
    "draw": "emulate.pictures", "draw_comparison": "emulate.pictures", "draw_coverage": "emulate.pictures",
    "draw_trace": "emulate.pictures",
}
# registered entries resolved by name (the Ray executor's description lives in cluster/, found through the registry)
_REGISTERED = {"Ray": "ray"}

__all__ = sorted([*_EXPORTS, *_REGISTERED, "executors", "oracles", "__version__"])


def oracles() -> list[str]:
    """The names `oracle=` and `--oracle` take: the built-ins and every registered one."""
    from emulate.runtime.registry import ORACLES

    return ORACLES.names()


def executors() -> list[str]:
    """The names `executor=` and `--executor` take: the built-ins and every registered one."""
    from emulate.runtime.registry import EXECUTORS

    return EXECUTORS.names()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _REGISTERED:
        from emulate.runtime.registry import EXECUTORS

        value = EXECUTORS.factory(_REGISTERED[name])
    elif name == "__version__":
        from emulate.version import version

        value = version()
    else:
        raise AttributeError(f"module 'emulate' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what IDEs and type checkers see; nothing of it is imported at run time
    from emulate.api import compile, monolithic, run, stream
    from emulate.errors import EmulateError, OptionError
    from emulate.generation import Generation, GenerationStream, Token, generate, generate_iter
    from emulate.models.config import ModelConfig
    from emulate.models.loaders import Model, load
    from emulate.models.presets import PRESETS
    from emulate.pictures import draw, draw_comparison, draw_coverage, draw_trace
    from emulate.problem import Problem, prepare
    from emulate.runtime.contract import (AttentionOracle, BlockOutput, BoundOracle, CallCounts, Execution, Executor, Job,
                                          PairCall)
    from emulate.runtime.local import Local
    from emulate.runtime.loop import Run, Stream
    from emulate.runtime.oracles import KernelOracle, PaperOracle
    from emulate.runtime.registry import register_executor, register_oracle
    from emulate.runtime.runner import NodeRunner
    from emulate.runtime.verify import row_errors, tolerance_for

    Ray: type  # cluster/options.py, resolved through the executor registry
    __version__: str
