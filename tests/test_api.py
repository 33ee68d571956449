"""The Python API as a user calls it: every keyword of `emulate.run`, `compile` and `stream`, the
result's shapes and figures, and the bad-argument errors (the same line the CLI prints)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest
import torch

import emulate
import emulate.runtime.oracles
import emulate.runtime.verify
from emulate.cli import main
from emulate.models.reference import reference_forward
from graphs import Pattern, counts

TOKENS = np.random.default_rng(0).integers(0, 1024, size=700)


@pytest.fixture(scope="module")
def llama():
    return emulate.load("tiny-llama")


def reference(model: emulate.Model, tokens, attention="auto", dtype=torch.float64, **pattern):
    from emulate.problem import resolve_patterns

    patterns = resolve_patterns(model.config, attention, pattern.get("window"), pattern.get("sinks"))
    with torch.no_grad():
        return reference_forward(model.transformer(dtype), torch.as_tensor(tokens), patterns)


# -- the result -----------------------------------------------------------------------------------

def test_run_gives_hidden_logprobs_stats_and_graph_equal_to_the_reference(llama):
    run = emulate.run(llama, TOKENS, block_size=64, attention="causal", dtype="float64", verify=True)
    ref = reference(llama, TOKENS)
    assert run.hidden.shape == (len(TOKENS), llama.config.width) and run.hidden.dtype == torch.float64
    assert run.logprobs.shape == (len(TOKENS) - 1,)
    rel = ((run.hidden - ref["hidden"]).norm(dim=1) / ref["hidden"].norm(dim=1)).max().item()
    assert rel < 1e-10
    assert (run.logprobs - ref["logprob_next"]).abs().max().item() < 1e-10
    assert run.stats["verified"] is True and run.stats["tolerance"] == 1e-10
    assert run.stats["max_rel_err"] == pytest.approx(rel, rel=1e-6, abs=1e-18)
    assert run.graph.number_of_nodes() == run.stats["graph_nodes"]
    assert counts(run.graph)["attention_calls"] == run.stats["attention_calls"]
    assert np.array_equal(run.tokens, TOKENS)


def test_stats_have_exactly_the_keys_of_the_cli_json(capsys, tmp_path):
    options = ["--random-tokens", "300", "--block-size", "64", "--verify", "--output", str(tmp_path / "a.arrow")]
    assert main(["run", *options, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = emulate.run(random_tokens=300, block_size=64, verify=True, output=str(tmp_path / "b.arrow")).stats
    assert list(api) == list(cli)  # same keys, same order
    for key in ("model", "tokens", "blocks", "attention_calls", "graph_depth", "verified", "tolerance"):
        assert api[key] == cli[key]


def test_encoders_have_no_logprobs():
    run = emulate.run("tiny-bert", random_tokens=200, block_size=64)
    assert run.logprobs is None and run.hidden.shape == (200, 256)


def test_a_loaded_model_runs_many_times_and_builds_its_weights_once(llama):
    first = emulate.run(llama, TOKENS[:100], block_size=32)
    built = llama.transformer(torch.float32)
    second = emulate.run(llama, TOKENS[:100], block_size=32)
    assert llama.transformer(torch.float32) is built
    assert torch.equal(first.hidden, second.hidden)


def test_tokens_as_array_tensor_or_list_give_the_same_bits(llama):
    runs = [emulate.run(llama, t, block_size=50) for t in (TOKENS[:150], torch.as_tensor(TOKENS[:150]),
                                                            TOKENS[:150].tolist())]
    assert all(torch.equal(runs[0].hidden, r.hidden) for r in runs[1:])


def test_text_input_and_random_tokens(tmp_path, llama):
    by_text = emulate.run(llama, text="hello, world", block_size=4)
    assert np.array_equal(by_text.tokens, np.frombuffer(b"hello, world", dtype=np.uint8))
    np.save(tmp_path / "ids.npy", TOKENS[:90])
    by_file = emulate.run(llama, input=str(tmp_path / "ids.npy"), block_size=32)
    assert torch.equal(by_file.hidden, emulate.run(llama, TOKENS[:90], block_size=32).hidden)
    (tmp_path / "t.txt").write_text("hello, world", encoding="utf-8")
    assert np.array_equal(emulate.run(llama, input=str(tmp_path / "t.txt"), block_size=4).tokens, by_text.tokens)
    a, b = (emulate.run(llama, random_tokens=64, seed=s, block_size=32).tokens for s in (1, 2))
    assert len(a) == 64 and not np.array_equal(a, b)
    assert np.array_equal(a, emulate.run(llama, random_tokens=64, seed=1, block_size=32).tokens)


def test_patterns_by_name_by_object_and_per_layer(llama):
    by_name = emulate.run(llama, TOKENS, block_size=64, attention="sink", window=100, sinks=4)
    by_object = emulate.run(llama, TOKENS, block_size=64, attention=Pattern("sink", window=100, sinks=4))
    assert torch.equal(by_name.hidden, by_object.hidden)
    assert by_name.stats["attention"] == "sink" and by_name.stats["window"] == 100 and by_name.stats["sinks"] == 4
    mixed = [Pattern("causal"), Pattern("sliding", window=64)] * 2
    run = emulate.run(llama, TOKENS, block_size=64, attention=mixed, dtype="float64", verify=True)
    assert run.stats["attention"] == "mixed(causal,sliding,causal,sliding)" and run.stats["verified"]


def test_oracles_by_name_and_by_object(llama):
    tokens = TOKENS[:96]
    kernel = emulate.run(llama, tokens, block_size=32, dtype="float64", oracle=emulate.KernelOracle())
    assert kernel.stats["oracle"] == "kernel" and "oracle_invocations" not in kernel.stats
    paper = emulate.run(llama, tokens, block_size=32, dtype="float64", oracle="paper-stable", pack_heads="all",
                        verify=True)
    same = emulate.run(llama, tokens, block_size=32, dtype="float64",
                       oracle=emulate.PaperOracle(stable=True, pack_heads=8), verify=True)
    assert paper.stats["oracle"] == "paper-stable" and paper.stats["oracle_pack_heads"] == 8
    assert paper.stats["oracle_invocations"] == same.stats["oracle_invocations"] > 0
    assert torch.equal(paper.hidden, same.hidden) and paper.stats["verified"]
    # the counts belong to a run: a description used twice starts from zero each time
    again = emulate.run(llama, tokens, block_size=32, dtype="float64", oracle=emulate.PaperOracle(stable=True, pack_heads=8))
    assert again.stats["oracle_invocations"] == same.stats["oracle_invocations"]


def test_output_file_and_collect_false(tmp_path, llama):
    out = tmp_path / "o.arrow"
    run = emulate.run(llama, TOKENS[:130], block_size=32, output=str(out), hidden=True, collect=False)
    assert run.hidden is None and run.logprobs is None and run.stats["output"] == str(out)
    with pa.ipc.open_file(out) as f:
        table = f.read_all()
    assert table.column_names == ["position", "token", "logprob", "hidden"] and table.num_rows == 130
    full = emulate.run(llama, TOKENS[:130], block_size=32)
    hidden = np.stack(table.column("hidden").to_numpy(zero_copy_only=False))
    assert np.array_equal(hidden, full.hidden.numpy())


def test_progress_reports_each_stage_until_done(llama):
    seen = []
    run = emulate.run(llama, TOKENS[:100], block_size=25, verify=True,
                      progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in seen))
    assert stages == ["graph", "forward", "reference"]
    forward = [(d, t) for stage, d, t in seen if stage == "forward"]
    total = run.stats["graph_nodes"]
    assert forward[-1] == (total, total) and len(forward) == total
    assert [d for d, _ in forward] == sorted(d for d, _ in forward)
    layers = llama.config.layers
    assert [(d, t) for stage, d, t in seen if stage == "graph"] == [(k, layers) for k in range(1, layers + 1)]
    assert [(d, t) for stage, d, t in seen if stage == "reference"] == [(k, layers) for k in range(1, layers + 1)]


def test_cli_progress_in_logs_is_a_line_per_step_of_a_long_stage(capsys):
    from emulate.cli import ProgressReport

    report = ProgressReport(terminal=False)
    report.QUIET_FOR_S = 0.0  # as if the stage had already run for long
    for done in range(1, 101):
        report("forward", done, 100)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("emulate: forward (calls) 100/100 (100%)")
    quick = ProgressReport(terminal=False)  # a stage shorter than 5 s says nothing
    for done in range(1, 101):
        quick("forward", done, 100)
    assert capsys.readouterr().err == ""


def test_verify_reports_a_failure_and_never_passes_nan(llama):
    run = emulate.run(llama, TOKENS[:64], block_size=16, verify=True, tolerance=1e-30)
    assert run.stats["verified"] is False and run.stats["tolerance"] == 1e-30
    # approximate modes state their own tolerance
    sampled = emulate.run("tiny-bert", random_tokens=256, block_size=64, attention="sampled", verify=True)
    assert sampled.stats["tolerance"] == emulate.runtime.verify.sampled_tolerance(256, 64, torch.float32)
    raw = emulate.run(llama, TOKENS[:64], block_size=16, oracle="paper", verify=True)
    assert raw.stats["tolerance"] == emulate.runtime.oracles.RAW_PAPER_TOLERANCE[torch.float32] and raw.stats["verified"]


def test_verify_failure_exits_1_with_one_line(capsys):
    code = main(["run", "--random-tokens", "64", "--block-size", "16", "--verify", "--tolerance", "1e-30", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["verified"] is False
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emulate: verify failed: max_rel_err")


# -- compile and stream ---------------------------------------------------------------------------

def test_compile_takes_a_count_and_runs_nothing(llama):
    g = emulate.compile("tiny-mistral", tokens=65536, block_size=1024)
    c = counts(g)
    assert c["max_call_tokens"] <= 1024 and g.graph["blocks"] == 64
    assert c["attention_calls"] <= c["attention_calls_bound"]
    by_ids = emulate.compile(llama, TOKENS, block_size=64)
    by_count = emulate.compile(llama, tokens=len(TOKENS), block_size=64)
    assert sorted(by_ids.nodes) == sorted(by_count.nodes) and sorted(by_ids.edges) == sorted(by_count.edges)


def test_stream_yields_blocks_in_order_with_the_bits_of_run(llama):
    s = emulate.stream(llama, TOKENS, block_size=64, attention="sink", window=100, sinks=4)
    blocks = list(s)
    assert [b for b, _ in blocks] == list(range(len(blocks))) == [out.block for _, out in blocks]
    assert [out.span for _, out in blocks] == [tuple(x) for x in s.graph.graph["block_spans"]]
    hidden = torch.cat([out.hidden for _, out in blocks])
    logprobs = torch.cat([out.logprobs for _, out in blocks])
    run = emulate.run(llama, TOKENS, block_size=64, attention="sink", window=100, sinks=4)
    assert torch.equal(hidden, run.hidden) and torch.equal(logprobs, run.logprobs)
    assert s.stats["forward_s"] > 0 and s.stats["attention_calls"] == run.stats["attention_calls"]
    with pytest.raises(emulate.EmulateError, match="runs once"):
        list(s)


def test_stream_stopped_early_is_fine(llama):
    s = emulate.stream(llama, TOKENS, block_size=64)
    seen = []
    for block, out in s:
        seen.append(out)
        if block == 2:
            break
    s.close()
    # the blocks it gave are the full run's, and a forward that did not finish claims no figures
    assert [out.block for out in seen] == [0, 1, 2] and s.stats == {}
    run = emulate.run(llama, TOKENS, block_size=64)
    for out in seen:
        assert torch.equal(out.hidden, run.hidden[out.span[0]:out.span[1]])
        assert torch.equal(out.logprobs, run.logprobs[out.span[0]:out.span[1]])
    with pytest.raises(emulate.EmulateError, match="runs once"):
        list(s)


# -- bad arguments: EmulateError with the CLI's line ----------------------------------------------

CASES = [
    (dict(block_size=0), ["--block-size", "0"]),
    (dict(attention="diagonal"), ["--attention", "diagonal"]),
    (dict(attention="sliding"), ["--attention", "sliding"]),
    (dict(attention="sink", window=64), ["--attention", "sink", "--window", "64"]),
    (dict(window=0), ["--window", "0"]),
    (dict(random_tokens=0), ["--random-tokens", "0"]),
    (dict(model="no-such-model"), ["--model", "no-such-model"]),
    (dict(workers=2), ["--workers", "2"]),
    (dict(oracle="paper", pack_heads=99), ["--oracle", "paper", "--pack-heads", "99"]),
    (dict(pack_heads=2), ["--pack-heads", "2"]),
    (dict(model="tiny-bert", attention="sampled", executor="ray"), ["--model", "tiny-bert", "--attention", "sampled",
                                                                     "--executor", "ray", "--oracle", "paper"]),
    (dict(tolerance=-1.0, verify=True), ["--tolerance", "-1", "--verify"]),
]


@pytest.mark.parametrize("keywords, flags", CASES, ids=[" ".join(f) for _, f in CASES])
def test_bad_arguments_raise_the_line_the_cli_prints(capsys, keywords, flags):
    keywords = dict(keywords)
    model = keywords.pop("model", None)
    if flags[-2:] == ["--oracle", "paper"]:
        keywords["oracle"] = "paper"
    with pytest.raises(emulate.EmulateError) as err:
        emulate.run(model, random_tokens=keywords.pop("random_tokens", 64), block_size=keywords.pop("block_size", 16),
                    **keywords)
    assert main(["run", *(flags if "--random-tokens" in flags else [*flags, "--random-tokens", "64"]),
                 *([] if "--block-size" in flags else ["--block-size", "16"])]) == 2
    assert capsys.readouterr().err == f"emulate: error: {err.value}\n"


@pytest.mark.parametrize("call, message", [
    (lambda: emulate.run("tiny-llama", 12), "is a count"),
    (lambda: emulate.run("tiny-llama", [[1, 2], [3, 4]]), "1-d sequence"),
    (lambda: emulate.run("tiny-llama", [0.5, 1.5]), "integer ids"),
    (lambda: emulate.run("tiny-llama", [1, 2], text="x"), "give one input"),
    (lambda: emulate.run("tiny-llama", [5000]), "outside tiny-llama's vocabulary"),
    (lambda: emulate.run("tiny-llama", [1, 2], dtype="float8"), "dtype must be"),
    (lambda: emulate.run("tiny-llama", [1, 2], device="tpu"), "device must be"),
    (lambda: emulate.run("tiny-llama", [1, 2], executor="dask"), "unknown executor"),
    (lambda: emulate.run("tiny-llama", [1, 2], executor=emulate.Ray(), workers=2), "inside emulate.Ray"),
    (lambda: emulate.Ray(workers=0), "--workers must be"),
    (lambda: emulate.Ray(stall_timeout=float("nan")), "--stall-timeout must be"),
    (lambda: emulate.run("tiny-llama", [1, 2], oracle=emulate.PaperOracle(pack_heads=0)), "pack_heads must be"),
    (lambda: emulate.run("tiny-llama", [1, 2], oracle=emulate.PaperOracle(), pack_heads=2), "inside emulate.PaperOracle"),
    (lambda: emulate.run("tiny-llama", [1, 2], oracle=emulate.PaperOracle(), executor="ray"), "local executor only"),
    (lambda: emulate.run("tiny-llama", [1, 2], attention=[Pattern("causal")]), "one Pattern per layer"),
    (lambda: emulate.run("tiny-llama", [1, 2], block_size=True), "--block-size must be an integer"),
    (lambda: emulate.run(42, [1, 2]), "model must be"),
    (lambda: emulate.run("tiny-llama", [1, 2], executor=emulate.Local), r"is a class: pass an instance, emulate\.Local\(\)"),
    (lambda: emulate.run("tiny-llama", [1, 2], oracle=emulate.KernelOracle), "is a class: pass an instance"),
    (lambda: emulate.run("tiny-llama", [1, 2], attention="sliding", window="8"), "--window must be an integer, got '8'"),
    (lambda: emulate.run("tiny-llama", [1, 2], attention="sliding", window=8.5), "--window must be an integer, got 8.5"),
    (lambda: emulate.run("tiny-llama", [1, 2], attention="sink", window=8, sinks=2.0), "--sinks must be an integer"),
    (lambda: emulate.run("tiny-llama", torch.zeros(4, dtype=torch.long, device="meta")), "meta device"),
])
def test_bad_python_arguments_are_one_line_errors(call, message):
    with pytest.raises(emulate.EmulateError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_version_and_public_names():
    assert emulate.__version__ and emulate.__version__ != "0+unknown"
    for name in emulate.__all__:
        assert hasattr(emulate, name), name


# -- threads: the local executor's torch threads, fixed or chosen from the machine ------------

def test_threads_fixed_and_auto_and_put_back(llama):
    import os

    from emulate.runtime.threads import cores

    before = torch.get_num_threads()
    one = emulate.run(llama, TOKENS[:200], block_size=64, threads=1)
    assert one.stats["threads"] == [1] and torch.get_num_threads() == before
    auto = emulate.run(llama, TOKENS[:200], block_size=64, threads="auto")
    assert auto.stats["threads"] and all(1 <= t <= min(cores(), before) <= os.cpu_count() for t in auto.stats["threads"])
    torch.testing.assert_close(one.hidden, auto.hidden, rtol=1e-5, atol=1e-5)
    default = emulate.run(llama, TOKENS[:200], block_size=64)
    assert default.stats["threads"] == [before]  # torch's own setting, untouched
    assert emulate.Local(threads=3).threads == 3 and emulate.Local().threads is None


@pytest.mark.parametrize("keywords, words", [
    (dict(threads=0), "--threads must be an integer >= 1 or auto"),
    (dict(threads="many"), "--threads must be an integer >= 1 or auto"),
    (dict(threads=2, executor="ray"), "--threads is not an option of the ray executor: add --executor local"),
    (dict(threads=2, executor=emulate.Local()), r"threads goes inside emulate.Local\(\.\.\.\)"),
])
def test_threads_refusals(llama, keywords, words):
    with pytest.raises(emulate.EmulateError, match=words):
        emulate.run(llama, TOKENS[:64], block_size=32, **keywords)


def test_auto_sees_a_busy_process():
    """A real busy process elsewhere shows up as a core taken (the count auto subtracts)."""
    import subprocess
    import sys
    import time

    from emulate.runtime.threads import running_elsewhere

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert max(running_elsewhere() for _ in range(5)) >= 1
    finally:
        busy.kill()
        busy.wait()


# -- the API's own shape ------------------------------------------------------------------------

def test_run_spells_out_every_keyword_and_stream_takes_the_same():
    import inspect

    run_keys = set(inspect.signature(emulate.run).parameters) - {"unknown"}
    stream_keys = set(inspect.signature(emulate.stream).parameters) - {"unknown"}
    assert {"block_size", "attention", "executor", "oracle", "workers", "threads", "verify", "output"} <= run_keys
    assert stream_keys == run_keys - {"output", "hidden", "verify", "tolerance", "collect"}


@pytest.mark.parametrize("function", ["run", "stream", "compile", "monolithic"])
def test_a_misspelt_keyword_names_the_function_and_the_closest_keyword(function):
    with pytest.raises(TypeError, match=rf"emulate\.{function}\(\) got an unexpected keyword argument 'dtyp'; "
                                        r"did you mean 'dtype'\?") as err:
        getattr(emulate, function)("tiny-llama", [1, 2], dtyp="float64")
    assert isinstance(err.value, emulate.EmulateError)  # the CLI's one line, too


def test_reprs_are_short():
    run = emulate.run("tiny-llama", random_tokens=300, block_size=64)
    for thing in (run, run.compact, emulate.load("tiny-llama"), emulate.stream("tiny-llama", random_tokens=64)):
        text = repr(thing)
        assert len(text) < 200 and "tensor(" not in text, text
