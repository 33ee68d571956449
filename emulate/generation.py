"""Generation after the prefill: `generate` and `generate_iter`, decoding on the block KV cache.

    prompt --prefill (the task graph, emulate/runtime/graph_backend.py)--> logits of the last
           position; every block's K/V kept where its projection ran (emulate/runtime/decode.py, KVCache)
    token --Decoder.step--> logits: per layer, the new query against each visible key block in
           one call of at most M keys, the partials merged by the prefill's merger
    logits --Sampler (emulate/runtime/sampling.py)--> the next token

Every figure is measured in the run: the calls are counted where they ran (prefill and decode
apart), the times taken around them. docs/generation.md explains the construction.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emulate.errors import EmulateError
from emulate.models.config import check_positions


@dataclass(frozen=True)
class Token:
    """One generated token as it comes: its id, its place among the new tokens (0 first), its
    position in the sequence, and the text it adds (None for a model without a tokenizer; "" while
    a character's bytes are still incomplete)."""

    id: int
    index: int
    position: int
    text: str | None


@dataclass(repr=False)
class Generation:
    """The result of `generate`: the new token ids, their text (None without a tokenizer), the run's figures.

    stats: prompt_tokens, new_tokens, stopped (eos, stop_id, max_new_tokens or interrupted), time_to_first_token_s, time_per_output_token_s,
    decode_tokens_per_s, prefill_s, kv_bytes, decode_calls_per_token,
    decode_attention_calls_per_token, max_call_tokens, ... (docs/generation.md lists them);
    with verify, the reference comparison. logits [new_tokens, vocab]: the scores each token was
    chosen from (with keep_logits=True or verify, else None).
    """

    tokens: list[int]
    text: str | None
    stats: dict
    prompt: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    logits: torch.Tensor | None = None

    def __repr__(self) -> str:
        s = self.stats
        return (f"<emulate.Generation {s.get('model', '?')}: {s.get('prompt_tokens')} prompt tokens + "
                f"{len(self.tokens)} new, {s.get('time_per_output_token_s')} s per token>")


class GenerationStream:
    """`generate_iter`'s result: iterate it for Tokens as they come; `result` is the Generation once done.

    Stopping early (break, close()) ends the generation; `result` then holds what was generated.
    """

    def __init__(self, run: _Generator):
        self._run = run
        self._iter = run.tokens()
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[Token]:
        try:
            yield from self._iter
        finally:
            self.result = self._run.result()

    @property
    def partial(self) -> Generation:
        """What was generated so far (an interrupt's report)."""
        return self._run.result()

    def close(self) -> None:
        self._iter.close()
        self.result = self._run.result()


def generate(model=None, prompt=None, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, input: str | None = None, block_size: int = 256, attention="auto",
             window: int | None = None, sinks: int | None = None, dtype="float32", device: str = "cpu",
             executor: Any = None, oracle: Any = "kernel", threads: int | str | None = None, verify: bool = False,
             keep_logits: bool = False, ignore_eos: bool = False, stop_ids=None, address: str | None = None,
             workers: int | None = None, placement: str | None = None,
             cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
             stall_timeout: float | None = None, worker_memory: int | None = None, grid: str | None = None,
             allow_past_positions: bool = False) -> Generation:
    """Generate up to `max_new_tokens` tokens after `prompt` (token ids, or text for a model with a tokenizer).

    The prefill is the task graph's forward (emulate.run's, on `executor`; each block's keys and
    values stay where they were made); each new token then runs through every layer as calls of at
    most M = block_size keys (docs/generation.md). temperature 0 is greedy; > 0 draws from the
    softmax of logits / temperature, cut to the top_p nucleus, with a generator seeded by `seed`.
    input: a file to read the prompt from (text or ids, as `emulate run --input`). verify: also
    run the monolithic forward over prompt and generated tokens and compare every step's logits
    (stats: verified, max_logit_err, reference_tokens_match). Generation stops after the model's
    end-of-sequence token (config.eos_ids; it is kept in the output, as transformers keeps it) unless
    ignore_eos, and after any of `stop_ids`; stats["stopped"] says why it ended. The prompt and the
    new tokens must fit the model's positions: a learned table's size, or a RoPE model's declared
    max_position_embeddings unless allow_past_positions (emulate/models/config.py, check_positions).
    executor "ray" (or emulate.Ray(...)): the prefill runs on Ray worker actors, each block's keys
    and values stay on the worker that projected them and the decode steps' calls run there
    (cluster/decode.py); address, workers, cpus_per_worker, gpus_per_worker, stall_timeout,
    placement ("sequence", "layers", "grid" or "auto"), grid and worker_memory go to the Ray executor
    (cluster/options.py), as emulate.run's do. Returns a Generation.
    """
    stream = generate_iter(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, input=input, block_size=block_size, attention=attention, window=window,
                           sinks=sinks, dtype=dtype, device=device, executor=executor, oracle=oracle, threads=threads,
                           verify=verify, keep_logits=keep_logits, ignore_eos=ignore_eos, stop_ids=stop_ids,
                           address=address, workers=workers, placement=placement,
                           cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                           stall_timeout=stall_timeout, worker_memory=worker_memory, grid=grid,
                           allow_past_positions=allow_past_positions)
    for _ in stream:
        pass
    return stream.result


def generate_iter(model=None, prompt=None, *, max_new_tokens: int = 16, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, input: str | None = None, block_size: int = 256,
                  attention="auto", window: int | None = None, sinks: int | None = None, dtype="float32",
                  device: str = "cpu", executor: Any = None, oracle: Any = "kernel",
                  threads: int | str | None = None, verify: bool = False,
                  keep_logits: bool = False, ignore_eos: bool = False, stop_ids=None, address: str | None = None,
                  workers: int | None = None, placement: str | None = None,
                  cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                  stall_timeout: float | None = None, worker_memory: int | None = None, grid: str | None = None,
                  allow_past_positions: bool = False) -> GenerationStream:
    """`generate`, yielding each Token as it is chosen; every argument is checked before this returns."""
    run = _Generator(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                     input=input, block_size=block_size, attention=attention, window=window, sinks=sinks, dtype=dtype,
                     device=device, executor=executor, oracle=oracle, threads=threads, verify=verify,
                     keep_logits=keep_logits, ignore_eos=ignore_eos, stop_ids=stop_ids, address=address,
                     workers=workers, placement=placement, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=gpus_per_worker, stall_timeout=stall_timeout, worker_memory=worker_memory,
                     grid=grid, allow_past_positions=allow_past_positions)
    return GenerationStream(run)


def decode_step(model=None, tokens=None, *, text: str | None = None, input: str | None = None,
                random_tokens: int | None = None, seed: int = 0, block_size: int = 256, attention="auto",
                window: int | None = None, sinks: int | None = None, dtype="float32"):
    """The logical graph of one decode step after the input (the token at position N, N the input's
    length; `tokens` may be a count): its calls and merges, nothing runs (emulate/runtime/decode.py,
    decode_graph). emulate.draw draws it; a causal layer has ceil((N + 1) / M) pair calls, a window O(1)."""
    from emulate.problem import prepare, shape_or_model
    from emulate.runtime.decode import decode_graph

    p = prepare(shape_or_model(model), tokens, count_only=True, graph_form="compact", text=text, input=input,
                random_tokens=random_tokens, seed=seed, block_size=block_size, attention=attention, window=window,
                sinks=sinks, dtype=dtype)
    config = p.model.config
    check_decodable(config, p.patterns)
    return decode_graph(config, list(p.patterns), p.length, p.block_size, p.dtype)


def stop_token_ids(stop_ids, config) -> tuple[int, ...]:
    """The user's stop ids, each a token of the model's vocabulary (an id outside it could never stop anything)."""
    if stop_ids is None:
        return ()
    if isinstance(stop_ids, (int, np.integer)) and not isinstance(stop_ids, bool):
        stop_ids = [stop_ids]
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise EmulateError(f"stop_ids must be a list of token ids, not {type(stop_ids).__name__}")
    ids = list(stop_ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < config.vocab:
            shown = int(t) if isinstance(t, (int, np.integer)) else repr(t)
            raise EmulateError(f"stop id {shown} is not a token of {config.name}'s vocabulary (0 .. {config.vocab - 1})")
    return tuple(int(t) for t in ids)


def check_decodable(config, patterns) -> None:
    """A decode step needs a language-model head and a causal mask on every layer (a new token sees
    only what came before it): one line otherwise, for generate and decode_step alike."""
    if not config.lm_head or not config.causal:
        raise EmulateError(f"{config.name} has no language-model head (an encoder): it cannot generate")
    if not all(pat.causal for pat in patterns):
        raise EmulateError(f"generation needs a causal mask on every layer (causal, sliding or sink), "
                           f"not {patterns[0].describe()}")


class _Generator:
    """One generation, resolved and checked: the prefill's backend, the cache, the sampler, the figures."""

    def __init__(self, model, prompt, *, max_new_tokens, temperature, top_p, seed, input, block_size, attention,
                 window, sinks, dtype, device, executor, oracle, threads, verify, keep_logits, ignore_eos, stop_ids,
                 address, workers, placement, cpus_per_worker=None, gpus_per_worker=None, stall_timeout=None,
                 worker_memory=None, grid=None, allow_past_positions=False):
        from emulate.problem import check_device, positive_int, prepare
        from emulate.runtime.contract import capability
        from emulate.runtime.decode import KVCache
        from emulate.runtime.graph_backend import GraphBackend
        from emulate.runtime.memory import check_fits, estimate
        from emulate.runtime.registry import EXECUTORS, ORACLES
        from emulate.runtime.sampling import Sampler, Sampling

        self.max_new = positive_int("max_new_tokens", max_new_tokens)
        self.sampling = Sampling(temperature, top_p, seed)
        check_device(device)
        ex = EXECUTORS.resolve("local" if executor is None else executor,
                               {"threads": threads, "address": address, "workers": workers, "placement": placement,
                                "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
                                "stall_timeout": stall_timeout, "worker_memory": worker_memory, "grid": grid})
        if not capability(ex, "keeps_kv"):
            raise EmulateError(f"generation needs an executor that keeps each block's keys and values where they "
                               f"were made; the {ex.name} executor does not (use the local or the ray executor)")
        chosen = ORACLES.resolve(oracle)
        text = prompt if isinstance(prompt, str) else None
        tokens = None if isinstance(prompt, str) else prompt
        if tokens is None and text is None and input is None:
            raise EmulateError("give a prompt: token ids, text, or input= a file")
        if tokens is not None and not isinstance(tokens, (int, np.integer)) and np.size(tokens) == 0:
            raise EmulateError("the prompt holds no tokens")
        p = prepare(model, tokens, text=text, input=input, block_size=block_size, attention=attention, window=window,
                    sinks=sinks, dtype=dtype, graph_form="compact")
        config = p.model.config
        check_decodable(config, p.patterns)
        if not isinstance(ignore_eos, bool):
            raise EmulateError(f"ignore_eos must be true or false, not {ignore_eos!r}")
        self.eos = frozenset(() if ignore_eos else config.eos_ids)
        self.stop = frozenset(stop_token_ids(stop_ids, config))
        self.stopped: str | None = None
        total = p.length + self.max_new
        if not isinstance(allow_past_positions, bool):
            raise EmulateError(f"allow_past_positions must be true or false, not {allow_past_positions!r}")
        check_positions(config, p.length, self.max_new, allow_past_positions)
        bound = chosen.bind(p.block_size, config.heads)
        item = p.dtype.itemsize
        kv = 2 * config.layers * config.kv_heads * config.head_dim * (total + p.block_size) * item
        parts = estimate(config, p.length, p.block_size, p.patterns, item, verify=verify, graph="compact")
        parts["KV cache"] = kv
        parts["logits"] = (keep_logits or verify) * self.max_new * config.vocab * item
        check_fits(parts, f"{p.length} prompt tokens + {self.max_new} new at M = {p.block_size}")
        self.problem, self.executor, self.oracle, self.bound, self.device = p, ex, chosen, bound, device
        # the prefill's store: this process's for the local executor; the Ray executor keeps the
        # blocks on its workers and hands back its own (the backend's kept_kv, once the prefill ran)
        self.cache = KVCache(config.layers, p.block_size, capacity=total - 1)  # the last token is never fed back
        self.backend = GraphBackend(p, p.compact_graph(), ex, chosen, device, kv=self.cache)
        self.replayed = 0  # decode steps run again on rebuilt blocks
        self.sampler = Sampler(self.sampling)
        self.verify, self.keep_logits = verify, keep_logits or verify
        self.detok = Detokenizer(p.model.tokenizer)
        self.new: list[int] = []
        self.scores: list[torch.Tensor] = []
        self.decoder = None
        self._times = {"prefill": None, "first": None, "decode": 0.0}

    def tokens(self) -> Iterator[Token]:
        from emulate.runtime.decode import Decoder, logits
        from emulate.runtime.loop import Stream

        p = self.problem
        t0 = time.perf_counter()
        prefill = Stream(self.backend)
        last = None
        try:
            for _, out in prefill:
                last = out.hidden[-1:]
            self.cache = self.backend.kept_kv
            model = p.model.transformer(p.dtype, self.device)
            self.prefill_stats = prefill.stats
            scores = logits(model, last)[0]
            self._times["prefill"] = prefill.stats["forward_s"]
            token = self._choose(scores)
            self._times["first"] = time.perf_counter() - t0
            yield self._token(token, p.length)
            if self._ends(token):
                return
            self.decoder = Decoder(model, list(p.patterns), self.cache, self.bound)
            with torch.no_grad():
                for i in range(1, self.max_new):
                    t1 = time.perf_counter()
                    scores = self._step(token, p.length + i - 1)
                    token = self._choose(scores)
                    self._times["decode"] += time.perf_counter() - t1
                    yield self._token(token, p.length + i)
                    if self._ends(token):
                        return
            self.stopped = "max_new_tokens"
        finally:
            close = getattr(self.cache, "close", None)  # the Ray workers that held the blocks
            if close is not None:
                close()

    def _step(self, token: int, position: int) -> torch.Tensor:
        """Decoder.step; when the store lost blocks (a Ray worker died), it makes them again and the
        steps before this one are replayed on them, the same calls as before (cluster/decode.py)."""
        from emulate.runtime.decode import Decoder, KVLost
        from emulate.runtime.threads import ThreadPolicy

        while True:
            try:
                # one torch thread for the step, the caller's count put back after (28 us a step): a
                # step is batch-1 GEMVs and calls of at most M keys, where intra-op threads spin more
                # than they give; SmolLM2 measured 57 ms a token on one thread against 228 to 260 ms on
                # torch's default two on 2 cores with other work running (docs/generation.md)
                with ThreadPolicy(1 if self.device == "cpu" else None):
                    return self.decoder.step(token, position)
            except KVLost:
                rebuild = getattr(self.cache, "rebuild", None)
                if rebuild is None:
                    raise
            rebuild()
            p = self.problem
            # the replay's calls are not this run's decode calls: counted apart, and dropped
            replay = Decoder(self.decoder.model, self.decoder.patterns, self.cache, self.bound)
            try:
                for at in range(p.length, position):
                    replay.step(self.new[at - p.length], at)
                    self.replayed += 1
            except KVLost:
                continue  # lost again meanwhile: rebuild again (the store bounds how often)

    def _ends(self, token: int) -> bool:
        """Whether the token just emitted ends the generation (it stays in the output)."""
        self.stopped = "eos" if token in self.eos else "stop_id" if token in self.stop else None
        return self.stopped is not None

    def _choose(self, scores: torch.Tensor) -> int:
        token = self.sampler(scores)
        self.new.append(token)
        if self.keep_logits:
            self.scores.append(scores)
        return token

    def _token(self, token: int, position: int) -> Token:
        return Token(token, len(self.new) - 1, position, self.detok.add(token))

    def result(self) -> Generation:
        """The Generation of what has run so far."""
        from emulate.runtime.memory import peak_rss_mb

        p, config = self.problem, self.problem.model.config
        steps = max(0, len(self.new) - 1)
        decode_s = self._times["decode"]
        d = self.decoder.counts if self.decoder is not None else None
        pre = getattr(self, "prefill_stats", {})
        stats = {
            "model": config.name, "prompt_tokens": p.length, "new_tokens": len(self.new), "tokens": list(self.new),
            "stopped": self.stopped or "interrupted",
            "text": self.detok.text(), "block_size": p.block_size, "attention": pre.get("attention"),
            "window": pre.get("window"), "dtype": str(p.dtype).removeprefix("torch."), "device": self.device,
            "executor": self.executor.name, "oracle": self.oracle.name,
            "temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "seed": self.sampling.seed,
            "prefill_s": self._times["prefill"],
            "time_to_first_token_s": None if self._times["first"] is None else round(self._times["first"], 4),
            "time_per_output_token_s": round(decode_s / steps, 6) if steps else None,
            "decode_tokens_per_s": round(steps / decode_s, 2) if steps and decode_s > 0 else None,
            "kv_bytes": self.cache.nbytes(),
            "kv_bytes_per_worker": list(getattr(self.cache, "worker_bytes", [self.cache.nbytes()])),
            "kv_rebuilds": getattr(self.cache, "rebuilds", 0), "decode_steps_replayed": self.replayed,
            "prefill_calls": pre.get("small_calls"), "prefill_attention_calls": pre.get("attention_calls"),
            "decode_steps": steps,
            "decode_calls": d.small_calls if d else 0, "decode_attention_calls": d.attention_calls if d else 0,
            "decode_calls_per_token": round(d.small_calls / steps, 3) if d and steps else None,
            "decode_attention_calls_per_token": round(d.attention_calls / steps, 3) if d and steps else None,
            "max_call_tokens": max(pre.get("max_call_tokens", 0), d.max_call_tokens if d else 0),
        }
        if "ray_workers" in pre:  # the workers that held the blocks (their pids at the prefill)
            stats.update({k: pre[k] for k in ("ray_workers", "placement", "ray_setup_s") if k in pre})
        logits = torch.stack(self.scores) if self.keep_logits and self.scores else None
        if self.verify and logits is not None:
            stats.update(self._compare(logits))
        stats["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return Generation(list(self.new), stats["text"], stats, p.tokens, logits)

    def _compare(self, got: torch.Tensor) -> dict:
        """The monolithic forward (emulate/models/reference.py) over the prompt and the tokens that ran.
        In 16 bits the logits are held to the relative contract of emulate/runtime/verify.py: their
        norm-wise error against the float64 forward's at most HALF_RATIO times the same-dtype
        monolithic forward's own (a near tie may then pick another token, so tokens do not gate)."""
        from emulate.runtime.verify import HALF_RATIO, normwise_error, tolerance_for

        p = self.problem
        ids = torch.from_numpy(np.concatenate([p.tokens, np.asarray(self.new[:-1], dtype=np.int64)]))
        t0 = time.perf_counter()
        if p.dtype in (torch.bfloat16, torch.float16):
            exact, same = self._reference(ids, torch.float64), self._reference(ids, p.dtype)
            err, own = normwise_error(got, exact), normwise_error(same, exact)
            out = {"reference_s": round(time.perf_counter() - t0, 4), "logit_err": err,
                   "monolithic_logit_err": own, "error_ratio": err / own if own > 0 else math.inf,
                   "tolerance": HALF_RATIO * own, "error_ratio_bound": HALF_RATIO}
            if self.sampling.greedy:
                out["reference_tokens_match"] = [int(t) for t in exact.argmax(dim=-1)] == self.new
            out["verified"] = bool(math.isfinite(err) and err <= HALF_RATIO * own)
            return out
        want = self._reference(ids, p.dtype)
        err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
        tol = tolerance_for(p.patterns, self.oracle, p.dtype)
        match = [int(t) for t in want.argmax(dim=-1)] == self.new
        out = {"reference_s": round(time.perf_counter() - t0, 4), "max_logit_err": err, "tolerance": tol}
        if self.sampling.greedy:
            out["reference_tokens_match"] = match
        out["verified"] = err <= tol and (match or not self.sampling.greedy)
        return out

    def _reference(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The monolithic forward's logits at every generated position, its weights in `dtype`."""
        from emulate.models.reference import reference_forward
        from emulate.runtime.decode import logits

        p = self.problem
        model = p.model.transformer(dtype, self.device)
        with torch.no_grad():
            hidden = reference_forward(model, ids, list(p.patterns))["hidden"]
            return logits(model, hidden[p.length - 1:])


class Detokenizer:
    """The text of the tokens so far, handed out piece by piece as it grows (None without a tokenizer)."""

    def __init__(self, tokenizer):
        self.ids: list[int] = []
        self.emitted = ""
        self.tok = None
        if isinstance(tokenizer, (str, Path)):
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tokenizer))
        elif tokenizer is not None:
            self.tok = tokenizer

    def add(self, token: int) -> str | None:
        if self.tok is None:
            return None
        self.ids.append(token)
        full = self.tok.decode(self.ids, skip_special_tokens=False)
        if full.endswith("\ufffd") or not full.startswith(self.emitted):
            return ""  # a character whose bytes are not all here yet
        piece, self.emitted = full[len(self.emitted):], full
        return piece

    def text(self) -> str | None:
        return None if self.tok is None else self.tok.decode(self.ids, skip_special_tokens=False)
