"""Generation on the block KV cache (emulate/generation.py, emulate/runtime/decode.py) against
transformers' own `generate` and against the monolithic reference (emulate/models/reference.py).

The transformers checkpoints are the seeded ones of tests/hf_models.py, saved with save_pretrained
and loaded by path; float64 runs use test_hf_parity's float64_hf patch, so that transformers is
float64 throughout (its RMSNorm and RoPE are float32 otherwise).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hf_models import VOCAB, as_transformers, checkpoint
from test_hf_parity import float64_hf  # noqa: F401 - the fixture

import emulate
from emulate.errors import EmulateError


def hf_generate(model, prompt: np.ndarray, new: int, **sampling) -> tuple[list[int], torch.Tensor]:
    """transformers' generate in float64: the new ids, and the float64 logits each was chosen from
    [new, vocab] (generate's own `logits` are cast to float32, generation/utils.py), read off one
    forward of the model over the prompt and the new ids."""
    model = model.to(torch.float64)
    ids = torch.from_numpy(prompt)[None]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **sampling)
        full = model(out.sequences[:, :-1]).logits[0, len(prompt) - 1:]
    assert torch.allclose(full.float(), torch.cat(out.logits), rtol=1e-5, atol=1e-5)  # the same steps
    return out.sequences[0, len(prompt):].tolist(), full


def greedy_against_transformers(family, tmp_path, new: int):
    """`new` tokens after a 61-token prompt at M = 16 (a ragged tail that fills and rolls over);
    mistral's window of 40 keeps only the blocks it reaches."""
    hf, path = checkpoint(family, tmp_path)
    prompt = np.random.default_rng(1).integers(0, VOCAB, 61)
    want, want_logits = hf_generate(hf, prompt, new, do_sample=False)
    got = emulate.generate(str(path), prompt, max_new_tokens=new, block_size=16, dtype="float64", keep_logits=True)
    assert got.tokens == want
    err = float((got.logits - want_logits).abs().max())
    assert err <= 1e-10, err
    s = got.stats
    assert s["max_call_tokens"] <= 16 and s["new_tokens"] == new and s["decode_steps"] == new - 1
    # counted calls: causal reads every block of the sequence so far, the window only the blocks it reaches
    blocks = [math.ceil((61 + i + 1) / 16) for i in range(new - 1)]
    if family == "llama":
        assert s["decode_attention_calls"] == 2 * sum(blocks)
    else:
        assert s["decode_attention_calls"] <= 2 * (new - 1) * (math.ceil(40 / 16) + 1) < 2 * sum(blocks)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_is_transformers_token_for_token(family, tmp_path, float64_hf):  # noqa: F811
    greedy_against_transformers(family, tmp_path, 40)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_is_transformers_for_256_tokens(family, tmp_path, float64_hf):  # noqa: F811
    greedy_against_transformers(family, tmp_path, 256)


def test_stops_after_the_eos_token_as_transformers_does(tmp_path, float64_hf):  # noqa: F811
    """A checkpoint whose eos_token_id is the 5th token greedy decoding produces without one: emulate
    and transformers' generate (its default: stop once eos is emitted, eos kept) stop right after it."""
    _, free_path = checkpoint("llama", tmp_path / "free")
    prompt = np.random.default_rng(1).integers(0, VOCAB, 61)
    free = emulate.generate(str(free_path), prompt, max_new_tokens=12, block_size=16, dtype="float64")
    assert free.stats["stopped"] == "max_new_tokens" and len(free.tokens) == 12
    eos = free.tokens[4]
    assert free.tokens.index(eos) == 4  # not produced earlier: the stop comes at the 5th token

    hf, path = checkpoint("llama", tmp_path / "eos", eos_token_id=eos)
    assert emulate.load(str(path)).config.eos_ids == (eos,)
    x = torch.from_numpy(prompt)[None]
    with torch.no_grad():
        want = hf.to(torch.float64).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    got = emulate.generate(str(path), prompt, max_new_tokens=12, block_size=16, dtype="float64")
    assert got.tokens == want == free.tokens[:5]
    assert got.stats["stopped"] == "eos" and got.stats["new_tokens"] == 5 and got.stats["decode_steps"] == 4

    past = emulate.generate(str(path), prompt, max_new_tokens=12, block_size=16, dtype="float64", ignore_eos=True)
    assert past.tokens == free.tokens and past.stats["stopped"] == "max_new_tokens"
    stop = free.tokens[7]
    at = free.tokens.index(stop)
    user = emulate.generate(str(path), prompt, max_new_tokens=12, block_size=16, dtype="float64", ignore_eos=True,
                            stop_ids=[stop])
    assert user.tokens == free.tokens[:at + 1] and user.stats["stopped"] == "stop_id"


def test_an_eos_as_the_first_token_ends_before_any_decode_step():
    prompt = np.arange(50) % 1024
    first = emulate.generate("tiny-llama", prompt, max_new_tokens=1).tokens[0]
    g = emulate.generate("tiny-llama", prompt, max_new_tokens=10, stop_ids=[first])
    assert g.tokens == [first] and g.stats["stopped"] == "stop_id" and g.stats["decode_steps"] == 0
    stream = emulate.generate_iter("tiny-llama", prompt, max_new_tokens=10)
    for _ in stream:
        break
    assert stream.result.stats["stopped"] == "interrupted"


def test_sampling_draws_are_transformers_draws(tmp_path, float64_hf):  # noqa: F811
    """Same seed, same temperature and top-p: the same float32 probabilities give the same draws."""
    hf, path = checkpoint("llama", tmp_path)
    prompt = np.random.default_rng(2).integers(0, VOCAB, 40)
    torch.manual_seed(7)
    want, _ = hf_generate(hf, prompt, 24, do_sample=True, temperature=0.9, top_p=0.8, top_k=0)
    got = emulate.generate(str(path), prompt, max_new_tokens=24, block_size=16, dtype="float64", temperature=0.9,
                           top_p=0.8, seed=7)
    assert got.tokens == want
    again = emulate.generate(str(path), prompt, max_new_tokens=24, block_size=16, dtype="float64", temperature=0.9,
                             top_p=0.8, seed=7)
    assert again.tokens == got.tokens
    other = emulate.generate(str(path), prompt, max_new_tokens=24, block_size=16, dtype="float64", temperature=0.9,
                             top_p=0.8, seed=8)
    assert other.tokens != got.tokens


@pytest.mark.parametrize("attention, extra", [("causal", {}), ("sliding", {"window": 50}),
                                              ("sink", {"window": 40, "sinks": 5})])
def test_matches_the_monolithic_reference(attention, extra):
    prompt = np.random.default_rng(0).integers(0, 1024, 70)
    g = emulate.generate("tiny-llama", prompt, max_new_tokens=12, block_size=16, dtype="float64",
                         attention=attention, verify=True, **extra)
    s = g.stats
    assert s["verified"] and s["reference_tokens_match"] and s["max_logit_err"] <= 1e-10
    assert s["max_call_tokens"] <= 16 and len(g.tokens) == 12 and g.text is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_generation_is_held_to_the_relative_contract(dtype):
    """In 16 bits verify compares the logits with a float64 and a same-dtype monolithic forward:
    the emulated error is a real rounding error (not 0, not the float64 contract's 1e-10) and within
    HALF_RATIO of the monolithic forward's own; a 16-bit merge of the partials would not be."""
    from emulate.runtime.verify import HALF_RATIO

    prompt = np.random.default_rng(1).integers(0, 1024, 70)
    s = emulate.generate("tiny-llama", prompt, max_new_tokens=8, block_size=16, dtype=dtype, ignore_eos=True,
                         verify=True).stats
    assert s["dtype"] == dtype and s["verified"] and s["error_ratio_bound"] == HALF_RATIO
    assert 1e-4 < s["monolithic_logit_err"] < 0.2 and s["logit_err"] > 1e-4
    assert s["error_ratio"] == pytest.approx(s["logit_err"] / s["monolithic_logit_err"])
    assert s["logit_err"] <= s["tolerance"] == pytest.approx(HALF_RATIO * s["monolithic_logit_err"])


def test_a_decode_step_runs_on_one_torch_thread_and_the_callers_count_comes_back():
    """Batch-1 steps of small calls run on one intra-op thread (docs/generation.md: several spin on
    a shared machine); the caller's count is back between the tokens it is handed."""
    from emulate.runtime.oracles import KernelOracle

    seen: list[int] = []

    class ThreadsSeen(KernelOracle):
        def attend(self, pair, q, k, v, scale):
            seen.append(torch.get_num_threads())
            return super().attend(pair, q, k, v, scale)

        def attend_blocks(self, pairs, q, k, v, scale):
            seen.append(torch.get_num_threads())
            return super().attend_blocks(pairs, q, k, v, scale)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = emulate.generate_iter("tiny-llama", np.arange(40) % 1024, max_new_tokens=4, block_size=16,
                                       oracle=ThreadsSeen(), ignore_eos=True)
        between = [torch.get_num_threads() for _ in stream]
    finally:
        torch.set_num_threads(before)
    assert between == [2, 2, 2, 2] and len(seen) > 0
    assert set(seen[-3 * 4:]) == {1}  # the three decode steps' calls, 4 layers


def test_window_calls_stay_flat_while_causal_grows():
    """Per-token pair calls counted as they ran: O(N / M) for causal, O(1) for a window."""
    def calls(n, attention, **extra):
        prompt = np.random.default_rng(0).integers(0, 1024, n)
        s = emulate.generate("tiny-llama", prompt, max_new_tokens=3, block_size=32, attention=attention,
                             **extra).stats
        return s["decode_attention_calls_per_token"]

    assert calls(96, "sliding", window=40) == calls(480, "sliding", window=40) == 4 * 3  # r = 40 reaches 3 blocks of 32
    assert calls(96, "causal") == 4 * 4 and calls(480, "causal") == 4 * 16


def test_the_cache_holds_little_more_than_the_sequence():
    """kv_bytes as held: every block's keys and values, the tail's room doubling as it fills."""
    prompt = np.random.default_rng(0).integers(0, 1024, 1000)
    g = emulate.generate("tiny-llama", prompt, max_new_tokens=8, block_size=256)
    exact = 2 * 4 * 2 * 32 * (1000 + 7) * 4  # K and V, 4 layers, 2 KV heads of 32, the positions that ran, float32
    assert exact <= g.stats["kv_bytes"] <= 1.1 * exact


def test_stream_yields_tokens_as_they_come_and_stops_early():
    prompt = np.arange(50) % 1024
    stream = emulate.generate_iter("tiny-llama", prompt, max_new_tokens=10, block_size=16)
    seen = []
    for tok in stream:
        seen.append(tok)
        if len(seen) == 4:
            break
    assert [t.index for t in seen] == [0, 1, 2, 3] and [t.position for t in seen] == [50, 51, 52, 53]
    assert stream.result.tokens == [t.id for t in seen]
    full = emulate.generate("tiny-llama", prompt, max_new_tokens=10, block_size=16)
    assert full.tokens[:4] == stream.result.tokens


def smollm2_against_transformers(prompt_tokens: int, new: int, block_size: int):
    """The real SmolLM2-135M (Q4_1 GGUF weights, dequantized) on real text in float32: the greedy
    tokens of transformers' generate on the same weights (a LlamaForCausalLM built from ours), and
    every step's logits within the float32 contract of the monolithic reference."""
    from emulate.inputs import default_text

    model = emulate.load("smollm2-135m")
    ids = model.tokenize(default_text())[:prompt_tokens]
    assert len(ids) == prompt_tokens
    g = emulate.generate(model, ids, max_new_tokens=new, block_size=block_size, verify=True)
    s = g.stats
    assert s["verified"] and s["reference_tokens_match"], s
    assert s["max_call_tokens"] <= block_size and isinstance(g.text, str) and g.text
    hf = as_transformers(model)
    x = torch.from_numpy(ids)[None]
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
    assert g.tokens == out[0, len(ids):].tolist()


@pytest.mark.slow
def test_smollm2_short_prompt_is_transformers():
    smollm2_against_transformers(512, 16, 128)


@pytest.mark.slow
def test_smollm2_4k_prompt_is_transformers():
    smollm2_against_transformers(4096, 64, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_p": 0.0}, "top_p must be"),
    ({"top_p": 1.5}, "top_p must be"),
    ({"seed": -1}, "seed must be"),
    ({"attention": "full"}, "generation needs a causal mask"),
    ({"stop_ids": [-1]}, "stop id -1 is not a token of tiny-llama's vocabulary"),
    ({"stop_ids": [1024]}, "stop id 1024 is not a token"),
    ({"stop_ids": ["7"]}, "stop id '7' is not a token"),
    ({"stop_ids": "7"}, "stop_ids must be a list"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(EmulateError, match=message):
        emulate.generate_iter("tiny-llama", [1, 2, 3], **{"max_new_tokens": 4, **kwargs})


def test_encoder_and_position_limit_are_refused():
    with pytest.raises(EmulateError, match="no language-model head"):
        emulate.generate_iter("tiny-bert", [1, 2, 3])
    with pytest.raises(EmulateError, match="no tokens"):
        emulate.generate_iter("tiny-llama", [])


class _ForgetsKeys:
    """An executor without the keeps_kv capability (emulate/runtime/contract.py)."""

    name = "forgetful"

    def start(self, job, progress=None):
        raise AssertionError("generation must refuse this executor before it starts")


def test_an_executor_that_does_not_keep_the_keys_is_refused():
    with pytest.raises(EmulateError, match="the forgetful executor does not"):
        emulate.generate_iter("tiny-llama", [1, 2, 3], executor=_ForgetsKeys())


@pytest.mark.parametrize("attention, extra", [("causal", {}), ("sink", {"window": 40, "sinks": 5})])
def test_the_decode_step_graph_is_the_calls_a_step_runs(attention, extra):
    """emulate graph --decode's graph (emulate/generation.py, decode_step) against a step that ran:
    the same pair calls per layer, counted where they ran."""
    from emulate.generation import decode_step
    from graphs import NodeKind

    prompt = np.random.default_rng(0).integers(0, 1024, 150)
    g = emulate.generate("tiny-llama", prompt, max_new_tokens=2, block_size=32, attention=attention, **extra)
    graph = decode_step("tiny-llama", prompt, block_size=32, attention=attention, **extra)
    attends = [a for _, a in graph.nodes(data=True) if a["kind"] == NodeKind.ATTEND]
    assert len(attends) == g.stats["decode_attention_calls"] and graph.graph["decode"]["position"] == 150
    assert max(a["tokens"] for a in attends) <= 32
