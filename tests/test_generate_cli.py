"""`emulate generate` on a real child process: streaming, --json, --verify, bad input, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from hf_models import checkpoint
from test_hardening import CHILD_ENV, EMULATE, emulate_child, one_error_line


def test_json_carries_the_measured_figures_and_verify():
    r = emulate_child("generate", "--model", "tiny-llama", "--text", "Hello there", "--max-new-tokens", "6",
                      "-M", "4", "--dtype", "float64", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["prompt_tokens"] == 11 and s["new_tokens"] == 6 and len(s["tokens"]) == 6
    assert s["verified"] and s["reference_tokens_match"] and s["max_logit_err"] <= 1e-10
    assert s["max_call_tokens"] <= 4 and s["decode_steps"] == 5
    # causal at M = 4 over positions 11..15: 3, 4, 4, 4, 4 key blocks, in each of 4 layers
    assert s["decode_attention_calls"] == 4 * (3 + 4 + 4 + 4 + 4)
    assert s["time_per_output_token_s"] > 0 and s["kv_bytes"] > 0 and s["executor"] == "local"


def test_bfloat16_verify_states_the_relative_contract():
    r = emulate_child("generate", "--model", "tiny-llama", "--text", "Hello there, friend", "--max-new-tokens", "5",
                      "-M", "4", "--dtype", "bfloat16", "--verify", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("verify"))
    assert "the monolithic bfloat16 forward's" in line and "(at most 1.25x)" in line and line.endswith(": verified")


def test_the_new_tokens_stream_to_stdout_and_the_summary_to_stderr():
    r = emulate_child("generate", "--model", "tiny-llama", "--text", "Hello", "--max-new-tokens", "5", "-M", "4")
    assert r.returncode == 0, r.stderr
    api = json.loads(emulate_child("generate", "--model", "tiny-llama", "--text", "Hello", "--max-new-tokens", "5",
                                   "-M", "4", "--json").stdout)
    assert r.stdout.split() == [str(t) for t in api["tokens"]]  # a model without a tokenizer prints the ids
    assert "generated  5 tokens after 5 prompt tokens" in r.stderr and "ms per token" in r.stderr


def test_sampling_is_reproducible_run_to_run():
    args = ("generate", "--model", "tiny-llama", "--text", "abc", "--max-new-tokens", "8", "--temperature", "1.5",
            "--top-p", "0.95", "--seed", "3", "--json")
    a, b = (json.loads(emulate_child(*args).stdout)["tokens"] for _ in range(2))
    assert a == b


# each a child process (seconds each); the library's refusals are tested in-process in test_generation.py
BAD = [
    (["--max-new-tokens", "-4"], "max_new_tokens must be an integer >= 1"),
    (["--max-new-tokens", str(10**13)], "more than the"),
    (["--temperature", "nan"], "temperature must be"),
    (["--top-p", "1.01"], "top_p must be"),
    (["--attention", "full"], "generation needs a causal mask"),
    (["--stop-id", "-1"], "stop id -1 is not a token of tiny-llama's vocabulary (0 .. 1023)"),
    (["--stop-id", "5", "--stop-id", "1024"], "stop id 1024 is not a token"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = emulate_child("generate", "--model", "tiny-llama", "--text", "abc", *args)
    assert r.returncode == 2 and message in one_error_line(r.stderr) and r.stdout == ""


def test_eos_ignore_eos_and_stop_ids(tmp_path):
    """A checkpoint whose eos is the 3rd greedy token: the child stops after it, goes on with
    --ignore-eos, and stops after a --stop-id."""
    import emulate

    _, free = checkpoint("llama", tmp_path / "free")
    ids = tmp_path / "prompt.npy"
    np.save(ids, np.random.default_rng(1).integers(0, 256, 40))
    tokens = emulate.generate(str(free), np.load(ids), max_new_tokens=10, block_size=16).tokens
    eos, stop = tokens[2], tokens[6]
    assert tokens.index(eos) == 2
    _, path = checkpoint("llama", tmp_path / "eos", eos_token_id=eos)
    common = ("generate", "--model", path, "--input", ids, "--max-new-tokens", "10", "-M", "16")

    r = emulate_child(*common)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(t) for t in tokens[:3]] and "stopped after the end-of-sequence token" in r.stderr
    past = json.loads(emulate_child(*common, "--ignore-eos", "--json").stdout)
    assert past["tokens"] == tokens and past["stopped"] == "max_new_tokens"
    unseen = min(set(range(256)) - set(tokens))  # --stop-id repeats: an id never produced changes nothing
    user = json.loads(emulate_child(*common, "--ignore-eos", "--stop-id", unseen, "--stop-id", stop, "--json").stdout)
    assert user["tokens"] == tokens[:tokens.index(stop) + 1] and user["stopped"] == "stop_id"


def test_bad_prompts_and_models_are_one_line(tmp_path):
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"\xff\xfe not utf-8")
    cases = [
        (["--model", "tiny-llama", "--text", ""], "no tokens"),
        (["--model", "tiny-llama", "--input", str(bad_text)], "UTF-8"),
        (["--model", "tiny-bert", "--text", "abc"], "no language-model head"),
        (["--model", "tiny-llama"], "give a prompt"),
    ]
    for args, message in cases:
        r = emulate_child("generate", *args)
        assert r.returncode == 2 and message in one_error_line(r.stderr), (args, r.stderr)
    r = subprocess.run([str(EMULATE), "generate", "--model", "tiny-llama", "--text", b"\xff\xfe".decode(
        "utf-8", "surrogateescape")], check=False, capture_output=True, env=CHILD_ENV, timeout=120)
    assert r.returncode == 2 and "not valid UTF-8" in one_error_line(r.stderr.decode())


def test_beyond_the_position_limit_is_refused(tmp_path):
    """gpt2's learned positions end at n_positions (512 in the checkpoint of tests/hf_models.py)."""
    _, path = checkpoint("gpt2", tmp_path)
    ids = tmp_path / "prompt.npy"
    np.save(ids, np.arange(500) % 256)
    r = emulate_child("generate", "--model", path, "--input", ids, "--max-new-tokens", "20")
    assert r.returncode == 2 and "exceed" in one_error_line(r.stderr) and "512 positions" in r.stderr


def test_ctrl_c_prints_what_was_generated_and_exits_130():
    child = subprocess.Popen([str(EMULATE), "generate", "--model", "tiny-llama", "--text", "abc", "-M", "8",
                              "--max-new-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=CHILD_ENV)
    first = b""
    while first.count(b" ") < 3:  # the stream has begun: a few ids are out (read unbuffered, so
        byte = os.read(child.stdout.fileno(), 1)  # that communicate() below gets all the rest)
        assert byte, child.communicate()
        first += byte
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    rest, stderr = child.communicate(timeout=60)
    stderr = stderr.decode()
    assert child.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == "emulate: interrupted by SIGINT" and "Traceback" not in stderr
    assert lines[0].startswith("emulate: generated ") and "tokens before the interrupt" in lines[0]
    printed = (first + rest).decode().split()
    told = json.loads(lines[0].split(": ", 2)[2])
    assert printed == [str(t) for t in told] and len(told) > 1


def test_graph_decode_counts_and_draws_one_step(tmp_path):
    """emulate graph --decode: a causal layer reads ceil((N + 1) / M) key blocks, a window the same few at any N."""
    def counts(n, *extra):
        r = emulate_child("graph", "--decode", "--random-tokens", n, "-M", "256", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["attention_calls_per_layer"]

    assert counts(1000) == [4] * 4 and counts(4000) == [16] * 4
    assert counts(1000, "--attention", "sliding", "--window", "300") == [2] * 4
    assert counts(4000, "--attention", "sliding", "--window", "300") == [2] * 4
    out = tmp_path / "step.svg"
    r = emulate_child("graph", "--decode", "--random-tokens", "1000", "-M", "256", "-o", out)
    assert r.returncode == 0 and out.read_text().startswith("<?xml") and "16 of them pair calls" in r.stderr


def test_past_a_rope_models_declared_context_is_refused_unless_allowed(tmp_path):
    """A llama checkpoint declaring max_position_embeddings 64: 60 prompt tokens + 8 new are refused in
    one line naming the limit and the opt-out; with --allow-past-positions they run (RoPE computes
    any position; transformers only warns there, generation/stopping_criteria.py MaxLengthCriteria)."""
    _, path = checkpoint("llama", tmp_path, max_position_embeddings=64)
    ids = tmp_path / "prompt.npy"
    np.save(ids, np.arange(60) % 256)
    r = emulate_child("generate", "--model", path, "--input", ids, "--max-new-tokens", "8", "-M", "16")
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and r.stdout == ""
    assert "60 prompt tokens + 8 new ones exceed" in line and "64 positions (max_position_embeddings)" in line
    assert "--allow-past-positions" in line
    ok = emulate_child("generate", "--model", path, "--input", ids, "--max-new-tokens", "8", "-M", "16",
                       "--allow-past-positions", "--ignore-eos", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["new_tokens"] == 8


def test_smollm2_is_refused_past_its_8192_positions(tmp_path):
    """smollm2-135m's GGUF declares llama.context_length 8192: 8190 prompt tokens + 8 are refused before any work."""
    ids = tmp_path / "prompt.npy"
    np.save(ids, np.arange(8190) % 1000)
    r = emulate_child("generate", "--model", "smollm2-135m", "--input", ids, "--max-new-tokens", "8")
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "8190 prompt tokens + 8 new ones exceed" in line and "8192 positions" in line
