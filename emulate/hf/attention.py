"""Bring your own model: any Hugging Face transformers model whose attention runs as the graph's pair calls.

    import emulate.hf
    emulate.hf.register(block_size=64)                     # registers attn_implementation="emulate"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="emulate")
    model(input_ids)                                        # every attention call: pair calls of <= M tokens
    emulate.hf.counts()                                     # pair calls per layer, the largest call

Each attention call of the model (query [B, H, N, dh], key and value [B, Hkv, N, dh]) is cut into
blocks of at most M tokens (graphs.patterns.block_spans). The layer's mask is read off the layer,
as transformers' own sdpa attention does (docs/design.md, Attention patterns):

    not module.is_causal                         -> Pattern("full")
    causal, sliding_window W (kwargs or module)  -> Pattern("sliding", window=W)
    causal otherwise                             -> Pattern("causal")

transformers' sliding window W (masking_utils.sliding_window_overlay: kv_idx > q_idx - W) lets
query i see keys i-W+1 .. i, which is exactly our window r = W (Def 2.4). Each query block
attends to the key blocks graphs.patterns.key_blocks names, with pair_mask's mask, through the
oracle's attend (the kernel by default), and the partials merge in key-block order with
emulate.runtime.merge.merge: the same calls and the same merge tree as the task graph's attend and merge
nodes. The other position-wise parts (norms, RoPE, MLPs) stay transformers' own.

What cannot be honoured exactly is refused with one EmulateError line, never approximated: a mask
that is not the layer's plain causal / sliding / full mask (padding, packed sequences, chunked or
bidirectional-window attention), logit soft-capping, attention sinks, position biases (ALiBi, T5),
and dropout in training mode.

Cached decoding (`model.generate()` with transformers' dynamic cache): a step's n queries are the
last n of the nk keys the cache hands over, so they attend the key blocks of [0, nk) their mask
reaches, each call at most M keys, merged as above (docs/generation.md). A cache whose keys are
not the sequence so far (a static cache's empty slots) fails the mask check and is refused.

A model in bfloat16 or float16 makes its pair calls in that dtype; the oracle must have the `half`
capability (emulate/runtime/contract.py, check_oracle_dtype: the kernel's), which returns each
partial in float32, so the merge above adds in float32 and only the merged output is rounded to
the model's dtype, where transformers' sdpa rounds its own (docs/numerics.md, 16 bits).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from emulate.errors import EmulateError
from emulate.runtime.contract import PairCall, check_oracle_dtype, combine_summaries
from emulate.runtime.merge import merge
from emulate.runtime.registry import ORACLES
from graphs import Pattern, block_spans, key_blocks, pair_mask

NAME = "emulate"


@dataclass
class _State:
    block_size: int | None = None
    oracle: object = None
    bound: dict = field(default_factory=dict)  # heads -> the oracle bound for a model with that many heads
    calls: dict = field(default_factory=dict)  # call site -> pair calls since the last reset
    invocations: dict = field(default_factory=dict)  # call site -> attention calls since the last reset
    patterns: dict = field(default_factory=dict)  # call site -> the Pattern it last ran
    blocks: dict = field(default_factory=dict)  # call site -> query blocks of its last call
    sites: dict = field(default_factory=dict)  # id(module) -> a call-site number, for modules without layer_idx
    masks: list = field(default_factory=list)  # (weak reference to a mask, the Pattern it was checked against)
    max_call_tokens: int = 0


_state = _State()


def register(block_size: int, oracle=None, name: str = NAME) -> str:
    """Register the attention function `name` (default "emulate") with transformers, and its mask function.

    block_size: M, the most query (and key) tokens any pair call sees. oracle: None (the kernel), a
    registered oracle's name, or any object with `name` and `bind` (emulate.AttentionOracle).
    Registering again replaces M and the oracle and resets the counts. Returns the name to pass
    as attn_implementation.
    """
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise EmulateError(f"block_size must be an integer >= 1, got {block_size!r}")
    oracle = ORACLES.resolve("kernel" if oracle is None else oracle)
    _state.block_size, _state.oracle = int(block_size), oracle
    _state.bound.clear()
    reset()
    AttentionInterface.register(name, attention)
    # sdpa's mask: None for a plain causal or full mask (nothing to check), a boolean [B, 1, q, kv] otherwise
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def require_transformers() -> None:
    """transformers is an extra: without it, one line saying how to get it, not an ImportError."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise EmulateError("the transformers backend needs transformers: pip install 'emulate[transformers]'")


def reset() -> None:
    """Forget the counts gathered so far."""
    _state.calls.clear()
    _state.invocations.clear()
    _state.patterns.clear()
    _state.blocks.clear()
    _state.sites.clear()
    _state.masks = []
    _state.max_call_tokens = 0


def counts() -> dict:
    """Pair calls since the last reset, per call site (the layer index where the module has one).

    attention_calls: all pair calls; attention_calls_per_layer: {site: pair calls}; invocations:
    {site: attention calls of the model}; patterns: {site: the pattern it ran}; blocks: {site: query
    blocks of its last call}; max_call_tokens: the most query or key tokens one pair call held
    (the graph's `tokens` of an attend node).
    """
    sites = sorted(_state.calls, key=str)
    return {
        "attention_calls": sum(_state.calls.values()),
        "attention_calls_per_layer": {s: _state.calls[s] for s in sites},
        "invocations": {s: _state.invocations[s] for s in sites},
        "patterns": {s: _state.patterns[s].describe() for s in sites},
        "blocks": {s: _state.blocks[s] for s in sites},
        "max_call_tokens": _state.max_call_tokens,
        "block_size": _state.block_size,
    }


def oracle_summary() -> dict:
    """The bound oracles' own figures since `register` (one bound oracle per head count the model ran),
    combined as the Ray executor combines its workers' (emulate/runtime/contract.py, combine_summaries)."""
    return combine_summaries([bound.summary() for bound in _state.bound.values()])


def layer_patterns() -> dict:
    """{call site: the Pattern it last ran} since the last reset."""
    return dict(_state.patterns)


def layer_pattern(module, kwargs: dict) -> Pattern:
    """The layer's mask as a Pattern, read as transformers' sdpa attention reads it."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        return Pattern("full")
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    if window is None:
        return Pattern("causal")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise EmulateError(f"emulate attention: layer {_site(module)} has sliding_window {window!r}, "
                           "not an integer >= 1")
    return Pattern("sliding", window=int(window))


def _site(module):
    layer = getattr(module, "layer_idx", None)
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return int(layer)
    return _state.sites.setdefault(id(module), f"site{len(_state.sites)}")


def _refuse_unsupported(module, kwargs: dict, dropout: float) -> None:
    site = _site(module)
    if kwargs.get("softcap") is not None:
        raise EmulateError(f"emulate attention: layer {site} soft-caps its attention logits (softcap="
                           f"{kwargs['softcap']}); the pair calls compute plain softmax attention (set "
                           "attn_logit_softcapping=None in the config, if the model allows it)")
    if kwargs.get("s_aux") is not None:
        raise EmulateError(f"emulate attention: layer {site} has attention sinks (s_aux), which the pair calls "
                           "do not model")
    if kwargs.get("position_bias") is not None:
        raise EmulateError(f"emulate attention: layer {site} adds a position bias to its scores (ALiBi, T5), "
                           "which the pair calls do not model")
    if dropout and dropout > 0:
        raise EmulateError(f"emulate attention: layer {site} asks for attention dropout {dropout} (training mode); "
                           "call model.eval()")


def _check_mask(attention_mask, pattern: Pattern, n: int, site, nk: int | None = None) -> None:
    """The mask transformers built must be exactly the layer's pattern: n queries at positions
    nk - n .. nk - 1 over keys 0 .. nk - 1 (nk = n without a cache).

    Checked a block of M rows at a time against the pattern's key ranges (one [M, nk] temporary), and
    once per mask: transformers builds one mask per layer type and forward and hands the same tensor
    to each layer of that type, so a mask already checked for this pattern is not read again.
    """
    if attention_mask is None:
        return
    nk = n if nk is None else nk
    if any(ref() is attention_mask and checked == pattern for ref, checked in _state.masks):
        return
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise EmulateError(f"emulate attention: layer {site} gets an attention mask of dtype {attention_mask.dtype}")
    if attention_mask.ndim != 4 or attention_mask.shape[-2:] != (n, nk):
        raise EmulateError(f"emulate attention: layer {site} gets a mask of shape {tuple(attention_mask.shape)}, "
                           f"not [batch, heads, {n}, {nk}]")
    keys = torch.arange(nk, device=attention_mask.device)
    for q0, q1 in block_spans(n, _state.block_size):
        rows = attention_mask[..., q0:q1, :]
        if rows.dtype == torch.bool:
            visible = rows
        else:
            # an additive mask: 0 where visible, the dtype's lowest (or -inf) where not; anything else is a bias
            masked = rows <= torch.finfo(rows.dtype).min / 2
            if not bool(((rows == 0) | masked).all()):
                raise EmulateError(f"emulate attention: layer {site} gets an additive attention bias (ALiBi or a "
                                   "custom float mask), which the pair calls do not model")
            visible = ~masked
        r = pattern.key_range(np.arange(nk - n + q0, nk - n + q1))
        lo, hi, sink_hi = (torch.from_numpy(x).to(keys.device)[:, None] for x in (r.lo, r.hi, r.sink_hi))
        want = ((keys >= lo) & (keys < hi)) | (keys < sink_hi)
        if not bool((visible == want).all()):
            raise EmulateError(f"emulate attention: layer {site}'s attention mask is not its plain "
                               f"{pattern.describe()} mask (padding, packed sequences, a static cache or a custom "
                               "mask); run unpadded sequences one at a time with transformers' dynamic cache")
    _state.masks = [*_state.masks[-3:], (weakref.ref(attention_mask), pattern)]


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
              scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention interface: query [B, H, N, dh], key/value [B, Hkv, N, dh] -> ([B, N, H, dh], None)."""
    if _state.block_size is None:
        raise EmulateError("emulate attention: call emulate.hf.register(block_size=M) first")
    site = _site(module)
    _refuse_unsupported(module, kwargs, dropout)
    B, H, n, dh = query.shape
    Hkv, nk = key.shape[1], key.shape[2]
    if nk < n:
        raise EmulateError(f"emulate attention: layer {site} attends {n} queries to only {nk} keys")
    if H % Hkv:
        raise EmulateError(f"emulate attention: layer {site} has {H} query heads over {Hkv} KV heads")
    check_oracle_dtype(_state.oracle, query.dtype)
    pattern = layer_pattern(module, kwargs)
    _check_mask(attention_mask, pattern, n, site, nk)
    scale = float(dh ** -0.5 if scaling is None else scaling)
    M = _state.block_size
    if H not in _state.bound:
        _state.bound[H] = _state.oracle.bind(M, H)
    oracle = _state.bound[H]
    # positions in the keys' frame: keys 0 .. nk - 1, queries the last n of them (a cached decoding
    # step has nk > n; a sliding-window cache keeps the last keys only, which the window alone reads)
    offset = nk - n
    key_spans = block_spans(nk, M)
    spans = [(offset + q0, offset + q1) for q0, q1 in block_spans(n, M)]
    out = torch.empty(B, n, H, value.shape[-1], dtype=query.dtype, device=query.device)
    layer = site if isinstance(site, int) else -1
    calls = 0
    for b in range(B):
        q, k, v = query[b], key[b], value[b]
        for i, (q0, q1) in enumerate(spans):
            qi = q[:, q0 - offset:q1 - offset].contiguous()
            blocks = (key_blocks(pattern, key_spans, i) if offset == 0 else
                      [j for j, span in enumerate(key_spans) if pair_mask(pattern, (q0, q1), span).visible > 0])
            partials = []
            for j in blocks:
                k0, k1 = key_spans[j]
                pm = pair_mask(pattern, (q0, q1), (k0, k1))
                pair = PairCall(layer, (q0, q1), (k0, k1), pm.kind, pattern)
                partials.append(oracle.attend(pair, qi, k[:, k0:k1].contiguous(), v[:, k0:k1].contiguous(), scale))
                _state.max_call_tokens = max(_state.max_call_tokens, q1 - q0, k1 - k0)
                calls += 1
            o, _ = merge(partials)
            out[b, q0 - offset:q1 - offset] = o.transpose(0, 1)
    _state.calls[site] = _state.calls.get(site, 0) + calls
    _state.invocations[site] = _state.invocations.get(site, 0) + 1
    _state.patterns[site] = pattern
    _state.blocks[site] = len(spans)
    return out, None
