"""The transformers backend: a checkpoint's own transformers model with its attention run as pair calls.

    emulate.run("path/to/checkpoint", backend="transformers", block_size=256, verify=True)
    emulate run --model path/to/checkpoint --backend transformers -M 256 --verify

The checkpoint (a directory with config.json, a .gguf file, or a transformers model already in
memory) loads with transformers itself, so every family whose attention goes through its
AttentionInterface runs, whatever emulate's own loader (emulate/models/loaders.py) knows. emulate/hf/attention.py's
attention is registered with M and the oracle, the model's attention is switched to it, and one
forward computes every attention call as the graph's pair calls; the position-wise parts (norms,
RoPE, MLPs, the head) are transformers' own, run over all N tokens at once. No task graph runs, so
the graph's figures (graph_nodes, graph_edges, graph_depth, small_calls) are None; the pair calls
are counted as they happen, and each layer's must be exactly the calls its pattern plans, none wider
than M (layer_figures).

`TransformersBackend` is a Backend of the one run loop (emulate/runtime/loop.py): it runs the
forward, cuts its outputs into blocks and names its reference; the loop writes, collects, verifies
and reports, as for the graph.

verify runs the same model, same weights, under transformers' sdpa attention (eager where the
family has no sdpa path) and compares hidden states and log-probabilities as the graph backend's
verify does (docs/numerics.md).
"""
from __future__ import annotations

import contextlib
import io
import logging as logging_module
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from emulate.errors import EmulateError, OptionError, error_line
from emulate.models.presets import FILE_PRESETS, PRESETS
from emulate.runtime.contract import BlockOutput, check_oracle_dtype
from emulate.runtime.kernels_cuda import kernel_figures
from emulate.runtime.loop import Reference, describe, window_of
from emulate.runtime.verify import TOLERANCE, tolerance_for
from graphs import block_spans, key_blocks

# what the reference forward runs, in order of preference
REFERENCE_ATTENTION = ("sdpa", "eager")


def source(model) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) of a checkpoint given by path or file preset."""
    name = str(model)
    if name in PRESETS:
        raise EmulateError(f"preset {name} has no transformers checkpoint (its weights are emulate's own); run it "
                           "with the graph backend, or give a checkpoint directory or .gguf file")
    path = Path(FILE_PRESETS[name]()) if name in FILE_PRESETS else Path(name)
    try:
        if path.suffix.lower() == ".gguf" and path.is_file():
            return path.parent, path.name
        if (path / "config.json").is_file():
            return path, None
    except OSError:  # a name too long for the file system, say
        pass
    raise EmulateError(f"{name} is not a checkpoint directory with a config.json, nor a .gguf file")


def load(model, dtype: torch.dtype, device: str, progress=None):
    """(transformers model in eval mode, name, tokenizer or None) for a path, a file preset or a loaded model.
    progress("load", 0, 1) is called before a GGUF file's load, which runs silent while transformers
    dequantises every tensor."""
    if isinstance(model, torch.nn.Module):
        if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
            raise EmulateError(f"{type(model).__name__} is not a transformers model (it has no set_attn_implementation)")
        return model.to(device=device, dtype=dtype).eval(), type(model).__name__, None
    from emulate.hf import require_transformers

    require_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging

    directory, gguf = source(model)
    if gguf is None:
        check_safetensors(directory)
    extra = {"gguf_file": gguf} if gguf else {"use_safetensors": True}
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # emulate reports its own progress (and --quiet means quiet)
    report = ReportCapture()
    try:
        config = AutoConfig.from_pretrained(directory, **extra)
        causal = gguf is not None or any(a.endswith("ForCausalLM") for a in config.architectures or ())
        cls = AutoModelForCausalLM if causal else AutoModel
        if gguf is not None and progress is not None:
            progress("load", 0, 1)
        with report, contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own bar, which no switch turns off
            loaded = cls.from_pretrained(directory, dtype=dtype, **extra)
    except Exception as err:  # noqa: BLE001 -- transformers, safetensors (SafetensorError), the GGUF reader: their own types
        raise EmulateError(f"{directory}: transformers cannot load this checkpoint ({report.problem(err)})") from None
    finally:
        if bars:
            logging.enable_progress_bar()
    missing = report.rows(("MISSING",))
    if missing:  # transformers would run with those weights drawn at random
        raise EmulateError(f"{directory}: the checkpoint does not hold every weight its config.json declares "
                           f"({missing[0]}{f', and {len(missing) - 1} more' if len(missing) > 1 else ''})")
    report.replay()  # other warnings of a load that succeeded still reach the user as they would have
    return loaded.to(device).eval(), str(model), _tokenizer(directory, gguf)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(directory: Path) -> None:
    """The backend loads safetensors only: a pickle file can run code as it is read (docs/security.md)."""
    if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in PICKLE_SUFFIXES)
    held = f"it holds {', '.join(pickles[:3])} (pickle)" if pickles else "it holds no model.safetensors"
    raise EmulateError(f"{directory}: the checkpoint must be safetensors; {held}, which is never loaded, since "
                       "reading a pickle can run code (convert it to safetensors where it is trusted)")


class ReportCapture(logging_module.Handler):
    """Holds transformers' log records while a model loads: its many-line load report (a table of
    mismatched or missing tensors) becomes one line naming the first, and on success the records
    go to transformers' own handlers as they would have."""

    def __init__(self):
        super().__init__(logging_module.WARNING)
        self.records: list = []
        self.logger = logging_module.getLogger("transformers")

    def emit(self, record) -> None:
        self.records.append(record)

    def __enter__(self):
        self.saved = self.logger.handlers[:]
        self.logger.handlers = [self]
        return self

    def __exit__(self, *exc) -> None:
        self.logger.handlers = self.saved

    def replay(self) -> None:
        for record in self.records:
            for handler in self.logger.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def rows(self, statuses=("MISMATCH", "MISSING", "CONVERSION")) -> list[str]:
        """The rows of a load report's table (key, status, detail) with one of these statuses, as lines."""
        import re

        found = []
        for record in self.records:
            for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
                cells = [c.strip() for c in line.split("|")]
                if len(cells) >= 3 and cells[1] in statuses:
                    found.append(f"{cells[1].lower()} {cells[0]}" + (f": {cells[2]}" if cells[2] else ""))
        return found

    def problem(self, err: BaseException) -> str:
        """One line: the first row of a load report, or the error's own first line."""
        rows = self.rows()
        return rows[0] if rows else error_line(err)


def _tokenizer(directory: Path, gguf: str | None):
    if gguf is not None:
        from emulate.models.gguf import read_tokenizer

        return read_tokenizer(directory / gguf)
    file = directory / "tokenizer.json"
    return file if file.is_file() else None


def switch(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as err:
        raise EmulateError(f"{type(model).__name__} cannot run attention {name!r} ({error_line(err)})") from None


def forward(model, ids: torch.Tensor, attention: str, block_size: int) -> dict:
    """One forward under `attention`: last hidden states [N, d], log p(next) [N - 1] (None for encoders), seconds."""
    switch(model, attention)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
        seconds = time.perf_counter() - t0
        logits = getattr(out, "logits", None)
        hidden = (out.hidden_states[-1] if logits is not None else out.last_hidden_state)[0]
        logprobs = None if logits is None else next_logprobs(logits[0], ids, block_size)
    return {"hidden": hidden, "logprobs": logprobs, "seconds": seconds}


def next_logprobs(logits: torch.Tensor, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """log p(ids[t + 1] | ids <= t), normalised a block of rows at a time (one [M, vocab] temporary), in
    float32 for a 16-bit model."""
    n = logits.shape[0]
    acc = torch.promote_types(logits.dtype, torch.float32)  # a 16-bit model's normalised in float32, as the graph's
    out = torch.empty(n - 1, dtype=acc, device=logits.device)
    for a, b in block_spans(n - 1, block_size) if n > 1 else ():
        out[a:b] = torch.log_softmax(logits[a:b].to(acc), dim=-1).gather(1, ids[a + 1:b + 1, None].to(logits.device))[:, 0]
    return out


def float32_norms(model) -> list[str]:
    """The norm classes of a float64 model that round their input to float32 (transformers' RMSNorms
    compute in float32 whatever the model's dtype): each is run on a float64 input and on the same
    input rounded to float32, and rounds where the two outputs are the same bits."""
    found: list[str] = []
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        name, weight = type(module).__name__, getattr(module, "weight", None)
        if (not name.endswith("Norm") or name in found or not isinstance(weight, torch.Tensor)
                or weight.dtype != torch.float64 or weight.ndim != 1):
            continue
        x = torch.randn(4, weight.shape[0], generator=gen, dtype=torch.float64).to(weight.device)
        with torch.no_grad():
            if torch.equal(module(x), module(x.float().double())):
                found.append(name)
    return found


def pick_reference(model) -> str:
    """sdpa where the family supports it, eager otherwise (soft-capping families, for example)."""
    for name in REFERENCE_ATTENTION:
        try:
            model.set_attn_implementation(name)
            return name
        except (ValueError, ImportError):
            continue
    raise EmulateError(f"{type(model).__name__} runs neither sdpa nor eager attention; nothing to verify against")


def layer_figures(counted: dict, patterns: dict, layers: int, tokens: int, block_size: int) -> dict:
    """The pair-call figures of the summary, from emulate.hf's counts and each layer's pattern.

    Each layer must have run its attention once, as exactly the pair calls its pattern plans over
    the blocks (graphs.patterns.key_blocks), none wider than M: else the forward is not the one the
    figures describe, and it is refused.
    """
    sites = [s for s in counted["attention_calls_per_layer"]]
    if set(sites) != set(range(layers)):
        ran = len(sites)
        raise EmulateError(f"the model ran attention at {ran} call sites, not once in each of its {layers} layers; "
                           "emulate counts a forward only when every layer's attention is its own")
    ordered = [patterns[layer] for layer in range(layers)]
    spans = block_spans(tokens, block_size)
    ran = [counted["attention_calls_per_layer"][layer] for layer in range(layers)]
    planned = [sum(len(key_blocks(p, spans, i)) for i in range(len(spans))) for p in ordered]
    if ran != planned:
        layer = next(k for k, (r, w) in enumerate(zip(ran, planned)) if r != w)
        raise EmulateError(f"layer {layer} ran {ran[layer]} pair calls where its {ordered[layer].describe()} pattern "
                           f"plans {planned[layer]} (a batch, or a layer called more than once per forward)")
    if counted["max_call_tokens"] > block_size:
        raise EmulateError(f"a pair call saw {counted['max_call_tokens']} tokens, more than M = {block_size}")
    return {
        "patterns": ordered,
        "attention_calls": counted["attention_calls"],
        "attention_calls_per_layer": ran,
        "attention_calls_bound": sum(p.calls_bound(len(spans), block_size) for p in ordered),
        "max_call_tokens": counted["max_call_tokens"],
    }


def shape(config) -> dict:
    """layers, heads, KV heads, width and head_dim of a transformers config (text_config for multimodal wrappers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    width = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    return {"family": text.model_type, "layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer"),
            "heads": heads, "kv_heads": getattr(text, "num_key_value_heads", None) or heads, "width": width,
            "head_dim": getattr(text, "head_dim", None) or (width // heads if width and heads else None),
            "vocab": getattr(text, "vocab_size", None)}


def check_forward_fits(dims: dict, dtype: torch.dtype, n: int, verify_too: bool = True) -> None:
    """Refuse, before the ids are drawn or read, a forward transformers would run out of memory on.

    transformers' forward over N tokens holds, at once, every layer's hidden states (it is asked for
    them: output_hidden_states), the logits of every position ([N, vocab]), and the ids; the
    reference of verify, run after it, holds the same again while the first outputs are kept.
    """
    from emulate.runtime.memory import check_fits

    b = dtype.itemsize
    width, layers, vocab = dims.get("width") or 0, dims.get("layers") or 0, dims.get("vocab") or 0
    parts = {"token ids": 8 * n, "hidden states": (layers + 1) * n * width * b, "logits": n * vocab * b}
    if verify_too:
        parts["kept outputs"] = n * (width + 1) * b
    check_fits(parts, f"{n} tokens through the transformers backend")


def check_ids(ids: np.ndarray, vocab: int | None, name: str) -> None:
    if len(ids) == 0:
        raise EmulateError("the input has no tokens")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.max() if ids.max() >= vocab else ids.min())
        raise EmulateError(f"token id {bad} is outside {name}'s vocabulary of {vocab}")


class TransformersBackend:
    """One forward of a transformers model with emulate's attention: a Backend of the one run loop."""

    def __init__(self, net, name: str, dims: dict, ids: np.ndarray, oracle, block_size: int, dtype: torch.dtype,
                 device: str, threads, source: str, progress=None, checkpoint=None):
        self.net, self.name, self.dims, self.oracle = net, name, dims, oracle
        self.checkpoint = checkpoint  # the path or file preset it loaded from; None for a model given in memory
        self.block_size, self.dtype, self.device, self.threads = block_size, dtype, device, threads
        self.source, self.progress = source, progress
        self.tokens = ids
        self.ids = torch.from_numpy(ids).to(device)
        self.compact = None
        self.width = dims["width"]
        self.lm_head = net.get_output_embeddings() is not None  # a causal LM's logits give log-probabilities
        self.metadata: dict | None = None  # the output file's, known once the forward ran (its layers' patterns)
        self._stats: dict = {}

    @classmethod
    def prepare(cls, model, tokens=None, *, text=None, input=None, random_tokens=None, seed: int = 0,
                block_size: int = 256, attention="auto", dtype="float32", device: str = "cpu", executor=None,
                oracle="kernel", pack_heads=None, threads=None, progress=None, **rest) -> TransformersBackend:
        """Check the options, load the model and the ids: everything a bad argument can fail on, before the forward."""
        from emulate.inputs import TEXT_SUFFIXES
        from emulate.problem import DEFAULT_MODEL, float_dtype, input_source, positive_int, token_ids
        from emulate.runtime.registry import ORACLES

        given = [flag for key, flag in NOT_FOR_THIS_BACKEND.items() if rest.get(key) is not None]
        unknown = sorted(set(rest) - set(NOT_FOR_THIS_BACKEND))
        if unknown:
            raise OptionError(f"emulate.run() got an unexpected keyword argument {unknown[0]!r}")
        if given:
            raise EmulateError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to the transformers "
                               "backend (it runs in-process, with each layer's own mask)")
        if executor is not None:
            raise EmulateError("the transformers backend runs in-process only, as transformers' own forward: it takes no "
                               "executor (drop --executor, or use the graph backend)")
        if attention != "auto":
            raise EmulateError("the transformers backend reads each layer's mask off the model: --attention must be auto")
        if device == "cuda" and not torch.cuda.is_available():
            raise EmulateError("device cuda asked for, but torch sees no CUDA device here")
        block_size = positive_int("--block-size", block_size)
        seed = positive_int("--seed", seed, 0)
        dt = float_dtype(dtype)
        chosen = ORACLES.resolve(oracle, {"pack_heads": pack_heads})
        check_oracle_dtype(chosen, dt)
        if threads is not None:
            from emulate.runtime.threads import check_threads

            threads = check_threads(threads)
        net, name, tokenizer = load(DEFAULT_MODEL if model is None else model, dt, device, progress)
        dims = shape(net.config)
        if tokenizer is None and (text is not None or (input is not None and Path(input).suffix.lower() in TEXT_SUFFIXES)):
            raise EmulateError(f"{name} comes without a tokenizer: give token ids (tokens, --input ids.npy or --random-tokens)")
        fits = partial(check_forward_fits, dims, dt, verify_too=True)
        if isinstance(random_tokens, int) and not isinstance(random_tokens, bool) and random_tokens > 0:
            fits(random_tokens)  # before a single id is drawn
        ids = token_ids(tokenizer, dims["vocab"], tokens, text, input, random_tokens, seed, fits)
        check_ids(ids, dims["vocab"], name)
        fits(len(ids))
        chosen.bind(block_size, dims["heads"])  # an oracle refuses what it cannot run before the forward
        return cls(net, name, dims, ids, chosen, block_size, dt, device, threads,
                   input_source(tokenizer, tokens, text, input, random_tokens, seed), progress,
                   None if isinstance(model, torch.nn.Module) else (DEFAULT_MODEL if model is None else model))

    def start(self) -> None:
        pass  # the model is loaded (prepare); the forward is the first block's

    def blocks(self):
        import emulate.hf as hf
        from emulate.runtime.threads import ThreadPolicy

        hf.register(block_size=self.block_size, oracle=self.oracle)
        if self.progress is not None:
            self.progress("forward", 0, 1)
        with ThreadPolicy(self.threads) as policy:  # "auto" is chosen once, for the whole forward
            got = forward(self.net, self.ids, hf.NAME, self.block_size)
        if self.progress is not None:
            self.progress("forward", 1, 1)
        n = len(self.tokens)
        blocks = len(block_spans(n, self.block_size))
        figures = layer_figures(hf.counts(), hf.layer_patterns(), self.dims["layers"], n, self.block_size)
        self._oracle_figures = hf.oracle_summary()
        hf.reset()
        self.patterns = figures.pop("patterns")
        self._seconds, self._threads, self._figures, self._blocks = got["seconds"], policy.used, figures, blocks
        self.metadata = {"model": self.name, "block_size": self.block_size, "attention": describe(self.patterns),
                         "dtype": str(self.dtype).removeprefix("torch."), "backend": "transformers"}
        yield from block_outputs(got["hidden"], got["logprobs"], self.block_size)

    def close(self) -> None:
        pass

    def summary(self, forward_s: float) -> dict:
        d = self.dims
        return {
            "model": self.name, "family": d["family"], "layers": d["layers"], "heads": d["heads"],
            "kv_heads": d["kv_heads"], "input": self.source, "tokens": len(self.tokens), "block_size": self.block_size,
            "blocks": self._blocks, "attention": describe(self.patterns), "window": window_of(self.patterns),
            "sinks": None, "oracle": self.oracle.name, "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device, "executor": "local", "backend": "transformers", **self._figures,
            "small_calls": None, "graph_nodes": None, "graph_edges": None, "graph_depth": None,
            "forward_s": round(self._seconds, 4), "threads": self._threads, **self._oracle_figures,
            **kernel_figures(self.dtype, self.dims["head_dim"], self.device),
        }

    def reference(self, progress=None, dtype: torch.dtype | None = None) -> Reference:
        """The same model, same weights, under sdpa (eager where the family has no sdpa path), in the
        run's dtype or in `dtype`: a 16-bit run's verify asks for float64 too (emulate/runtime/loop.py)."""
        net = self.net if dtype is None or dtype == self.dtype else self.model_in(dtype)
        reference = pick_reference(net)
        if progress is not None:
            progress("reference", 0, 1)
        want = forward(net, self.ids, reference, self.block_size)
        if progress is not None:
            progress("reference", 1, 1)
        del net
        stats = {"reference": reference, "reference_s": round(want["seconds"], 4)}
        rounding = self.float32_norms() if dtype is None else []
        if rounding:
            stats["reference_note"] = (
                f"the model's norms ({', '.join(rounding)}) round to float32 in both forwards: the reference shares "
                "that step, which hides any difference below float32's rounding, so verify bounds the pair calls' "
                "error at the float32 contract, not float64's")
        return Reference(want["hidden"], want["logprobs"], stats)

    def model_in(self, dtype: torch.dtype):
        """The model in another dtype, for a reference: a checkpoint loaded again (its weights as stored,
        as the graph backend's float64 reference casts the stored weights), a model given in memory
        copied and cast (its weights as they ran)."""
        import copy

        from emulate.runtime.memory import check_fits

        params = sum(p.numel() for p in self.net.parameters())
        check_fits({f"its weights in {str(dtype).removeprefix('torch.')}": params * dtype.itemsize},
                   f"the {str(dtype).removeprefix('torch.')} reference of {self.name}")
        if self.checkpoint is not None:
            return load(self.checkpoint, dtype, self.device)[0]
        return copy.deepcopy(self.net).to(dtype)

    def float32_norms(self) -> list[str]:
        """float32_norms of a float64 model (empty for float32, where rounding to float32 is the contract)."""
        if self.dtype != torch.float64:
            return []
        if not hasattr(self, "_float32_norms"):
            self._float32_norms = float32_norms(self.net)
        return self._float32_norms

    def tolerance(self) -> float:
        """The mode's contract; for a float64 model whose norms round to float32 (float32_norms), float32's:
        both forwards round at the same norms, so an agreement below that is not a float64 measurement."""
        own = tolerance_for(self.patterns, self.oracle, self.dtype, len(self.tokens), self.block_size)
        return max(own, TOLERANCE[torch.float32]) if self.float32_norms() else own

    def __repr__(self) -> str:
        return f"<TransformersBackend {self.name}: {len(self.tokens)} tokens, M = {self.block_size}>"


def block_outputs(hidden: torch.Tensor, logprobs: torch.Tensor | None, block_size: int):
    """The outputs cut into the blocks the graph backend streams."""
    n = hidden.shape[0]
    for i, (a, b) in enumerate(block_spans(n, block_size)):
        yield BlockOutput(i, (a, b), hidden[a:b], None if logprobs is None else logprobs[a:min(b, n - 1)])


NOT_FOR_THIS_BACKEND = {"window": "--window", "sinks": "--sinks", "trace": "--trace", "address": "--address",
                        "workers": "--workers", "cpus_per_worker": "--cpus-per-worker",
                        "gpus_per_worker": "--gpus-per-worker", "stall_timeout": "--stall-timeout",
                        "placement": "--placement", "worker_memory": "--worker-memory",
                        "grid": "--grid"}
