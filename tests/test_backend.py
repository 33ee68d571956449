"""`emulate run --backend transformers` and emulate.run(..., backend="transformers") end to end.

A checkpoint of a family emulate's own loader does not read (qwen3, with a full layer and a
sliding one) runs through its own transformers model with the emulate attention: the summary has
the graph backend's keys, the pair calls are the task graph's, verify compares with the same model
under sdpa, and what the backend cannot take is refused with one line and exit 2.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers
from hf_models import SMALL, VOCAB, checkpoint, seeded

import emulate
from emulate.cli import main
from graphs import Pattern

N, M = 300, 64


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    config = transformers.Qwen3Config(**SMALL, head_dim=16, use_sliding_window=True, sliding_window=48,
                                      max_window_layers=1)
    path = tmp_path_factory.mktemp("qwen3") / "qwen3"
    seeded(transformers.Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return checkpoint("llama", tmp_path_factory.mktemp("llama"))[1]


def run_json(capsys, *args) -> dict:
    assert main(["run", *map(str, args), "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


def _per_layer(pattern: Pattern) -> int:
    from graphs import counts

    return counts(emulate.compile("tiny-llama", tokens=N, block_size=M, attention=pattern))["attention_calls_per_layer"][0]


def test_cli_runs_a_family_the_graph_loader_does_not_read(qwen3, tmp_path, capsys):
    out = tmp_path / "out.arrow"
    s = run_json(capsys, "--model", qwen3, "--backend", "transformers", "--random-tokens", N, "-M", M, "--verify",
                 "--output", out, "--hidden")
    assert (s["backend"], s["family"], s["reference"], s["verified"]) == ("transformers", "qwen3", "sdpa", True)
    assert s["max_rel_err"] <= 2e-5 and s["max_logprob_err"] <= 1e-4
    assert s["attention"] == "mixed(causal,sliding)" and s["window"] == 48
    want = [_per_layer(Pattern("causal")), _per_layer(Pattern("sliding", window=48))]
    assert s["attention_calls_per_layer"] == want and s["attention_calls"] == sum(want)
    assert s["attention_calls_bound"] == Pattern("causal").calls_bound(5, M) + Pattern("sliding", window=48).calls_bound(5, M)
    assert s["max_call_tokens"] == M and s["blocks"] == 5 and s["tokens"] == N
    assert s["graph_nodes"] is None and s["small_calls"] is None  # no task graph ran
    table = pa.ipc.open_file(str(out)).read_all()
    run = emulate.run(str(qwen3), random_tokens=N, block_size=M, backend="transformers")
    assert table.column("token").to_pylist() == run.tokens.tolist()
    logprob = np.asarray(table.column("logprob").to_pylist()[1:], dtype=np.float32)  # null at position 0
    assert np.array_equal(logprob, run.logprobs.numpy())  # same model, same calls: the same bits
    assert s["perplexity"] == pytest.approx(math.exp(-float(run.logprobs.double().mean())), rel=1e-12)


def test_summary_keys_are_the_graph_backends(llama, capsys):
    graph = run_json(capsys, "--model", llama, "--random-tokens", N, "-M", M, "--verify")
    backend = run_json(capsys, "--model", llama, "--backend", "transformers", "--random-tokens", N, "-M", M, "--verify")
    assert set(backend) - set(graph) == {"reference"} and set(graph) <= set(backend)
    assert graph["backend"] == "graph" and graph["verified"] and backend["verified"]
    for key in ("attention", "attention_calls", "attention_calls_per_layer", "attention_calls_bound", "max_call_tokens",
                "blocks", "tokens", "layers", "heads", "kv_heads"):
        assert graph[key] == backend[key], key
    # both run the same checkpoint: their next-token figures agree to float32 rounding
    assert backend["perplexity"] == pytest.approx(graph["perplexity"], rel=1e-4)


def test_float64_and_an_in_memory_model():
    model = seeded(transformers.MistralForCausalLM._from_config(
        transformers.MistralConfig(**SMALL, sliding_window=40), attn_implementation="sdpa"))
    ids = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(3))
    run = emulate.run(model, ids, block_size=M, dtype="float64", backend="transformers", verify=True)
    s = run.stats
    assert s["verified"] and s["attention"] == "sliding" and s["window"] == 40
    assert run.hidden.dtype == torch.float64 and run.logprobs.shape == (N - 1,)
    assert s["attention_calls_per_layer"] == [_per_layer(Pattern("sliding", window=40))] * 2
    # Mistral's RMSNorm computes in float32 even in a float64 model, in the reference too: the final
    # norm's rounding makes both outputs the same bits, so verify says what it can bound instead of
    # passing float64's 1e-10 on an error it cannot see
    assert s["max_rel_err"] == 0 and s["tolerance"] == 2e-5
    assert "MistralRMSNorm" in s["reference_note"] and "float32 contract" in s["reference_note"]


def test_float64_norms_keep_the_float64_contract(tmp_path, capsys):
    """GPT-2's LayerNorm runs in float64: the pair calls' own error shows (1e-15, not 0) and 1e-10 applies."""
    _, path = checkpoint("gpt2", tmp_path)
    s = run_json(capsys, "--model", path, "--backend", "transformers", "--random-tokens", N, "-M", M, "--dtype",
                 "float64", "--verify")
    assert s["verified"] and 0 < s["max_rel_err"] <= 1e-10 and s["tolerance"] == 1e-10 and "reference_note" not in s


def test_the_note_is_in_the_human_summary(llama, capsys):
    assert main(["run", "--model", str(llama), "--backend", "transformers", "--random-tokens", "100", "-M", "32",
                 "--dtype", "float64", "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "verified (tolerance 2e-05)" in out and "(LlamaRMSNorm) round to float32 in both forwards" in out


def test_an_encoder_has_no_perplexity(tmp_path):
    _, path = checkpoint("bert", tmp_path)
    run = emulate.run(str(path), random_tokens=100, block_size=32, backend="transformers", verify=True)
    assert run.logprobs is None and "perplexity" not in run.stats and run.stats["attention"] == "full"
    assert run.stats["verified"] and run.stats["attention_calls"] == 2 * 4 * 4


@pytest.mark.parametrize("args, words", [
    (["--model", "tiny-llama"], "preset tiny-llama has no transformers checkpoint"),
    (["--model", "{llama}", "--executor", "ray"], "runs in-process only"),
    (["--model", "{llama}", "--attention", "causal"], "--attention must be auto"),
    (["--model", "{llama}", "--window", "8"], "--window does not apply to the transformers backend"),
    (["--model", "{llama}", "--text", "hello"], "comes without a tokenizer"),
    (["--model", "{llama}/nothing-here"], "is not a checkpoint directory"),
    (["--model", "{llama}", "--random-tokens", "8", "-M", "0"], "--block-size must be an integer >= 1"),
    (["--model", "{llama}", "--random-tokens", "1000000000"], "through the transformers backend would hold about"),
])
def test_refusals(llama, capsys, args, words):
    args = [a.replace("{llama}", str(llama)) for a in args]
    if "--random-tokens" not in args and "--text" not in args:
        args += ["--random-tokens", "16"]
    assert main(["run", "--backend", "transformers", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_perplexity_of_a_graph_run_is_its_logprobs():
    run = emulate.run("tiny-llama", random_tokens=200, block_size=64)
    assert run.stats["perplexity"] == pytest.approx(math.exp(-float(run.logprobs.double().mean())), rel=1e-12)
    assert "perplexity" not in emulate.run("tiny-bert", random_tokens=64, block_size=32).stats


def test_the_paper_oracle_runs_the_pairs(tmp_path):
    # GPT-2: its LayerNorm runs in float64, so the pair calls' own error is in view (llama's RMSNorm
    # rounds to float32 on both sides and would show 0 whatever the oracle computed)
    _, path = checkpoint("gpt2", tmp_path)
    run = emulate.run(str(path), random_tokens=100, block_size=32, dtype="float64", backend="transformers",
                      oracle="paper-stable", pack_heads="all", verify=True)
    s = run.stats
    assert s["oracle"] == "paper-stable" and s["verified"] and s["tolerance"] == 1e-10
    assert 0 < s["max_rel_err"] <= 1e-10 and "reference_note" not in s


@pytest.mark.parametrize("args, words", [
    (["--threads", "0"], "--threads must be an integer >= 1 or auto"),
    (["--threads", "many"], "--threads"),
    (["--threads", "2", "--executor", "ray"], "--threads is not an option of the ray executor"),
    (["--backend", "onnx"], "--backend"),
])
def test_new_options_refuse_bad_values_in_one_line(capsys, tmp_path, args, words):
    out = tmp_path / "out.arrow"
    assert main(["run", "--random-tokens", "16", "-M", "8", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_without_transformers_the_backend_says_how_to_get_it(llama, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(emulate.EmulateError, match=r"pip install 'emulate\[transformers\]'"):
        emulate.run(str(llama), random_tokens=16, block_size=8, backend="transformers")


# -- families emulate's own loader does not read --------------------------------------------------

@pytest.fixture(scope="module")
def unread(tmp_path_factory):
    """Seeded phi3 and gemma2 checkpoints (gemma2: layer 0 sliding with a window of 40, layer 1 full; no
    soft-capping, which the pair calls refuse)."""
    root = tmp_path_factory.mktemp("unread")
    phi3 = transformers.Phi3Config(**{**SMALL, "pad_token_id": None})
    seeded(transformers.Phi3ForCausalLM._from_config(phi3, attn_implementation="sdpa")).save_pretrained(root / "phi3")
    gemma2 = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=40, attn_logit_softcapping=None)
    seeded(transformers.Gemma2ForCausalLM._from_config(gemma2, attn_implementation="eager")).save_pretrained(
        root / "gemma2")
    return root


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_run_of_a_family_the_loader_does_not_read_names_the_backend_that_does(unread, family):
    from test_hardening import emulate_child, one_error_line

    child = emulate_child("run", "--model", unread / family, "--random-tokens", 64, "-M", 16)
    line = one_error_line(child.stderr)
    assert child.returncode == 2 and child.stdout == ""
    assert f"does not read model_type '{family}'" in line and "--backend transformers runs" in line, line
    # and it does
    s = emulate.run(str(unread / family), random_tokens=64, block_size=16, backend="transformers", verify=True).stats
    assert s["verified"] and s["family"] == family


def test_graph_draws_any_family_from_its_config(unread, tmp_path):
    from test_hardening import emulate_child

    out = tmp_path / "gemma2.svg"
    child = emulate_child("graph", "--model", unread / "gemma2", "--random-tokens", 320, "-M", 32, "-o", out)
    assert child.returncode == 0 and out.stat().st_size > 0, child.stderr
    # its own masks, as the transformers backend runs them: layer 0 slides over 40 keys, layer 1 is causal
    for given in (unread / "gemma2", unread / "gemma2" / "config.json"):
        g = emulate.compile(str(given), 320, block_size=32, compact=True)
        assert [p.describe() for p in g.spec.patterns] == ["sliding(r=40)", "causal"]
        per_layer = g.counts()["attention_calls_per_layer"]
        assert per_layer[1] == 10 * 11 // 2 and per_layer[0] < per_layer[1]
    run = emulate.run(str(unread / "gemma2"), random_tokens=320, block_size=32, backend="transformers")
    assert run.stats["attention_calls_per_layer"] == per_layer
    child = emulate_child("graph", "--model", unread / "phi3" / "config.json", "--random-tokens", 320, "-M", 32, "--json")
    s = json.loads(child.stdout)
    assert child.returncode == 0 and s["layers"] == 2 and s["attention"] == ["causal"] and s["blocks"] == 10
