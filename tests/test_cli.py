"""`emulate run` and `emulate graph` end to end: the JSON summary, the Arrow output, input formats
and the one-line errors of every bad input.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import torch

import emulate
from emulate.cli import main
from emulate.problem import resolve_patterns
from emulate.runtime.verify import sampled_tolerance
from emulate.inputs import DEFAULT_TEXT_NAME
from emulate.models.block import Transformer
from emulate.models.presets import preset
from emulate.models.reference import reference_forward
from graphs import build_graph, counts, from_json

ROOT = Path(__file__).resolve().parents[1]
# the installed entry point, beside the interpreter running the tests (a venv, or CI's)
EMULATE = Path(sys.executable).with_name("emulate")
# one intra-op thread per child: the suite's processes share the cores, and oversubscribed torch
# threads wait on each other (a 4096-token run goes from seconds to a minute on a busy machine)
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")

SUMMARY_KEYS = {
    "model", "family", "layers", "heads", "kv_heads", "input", "tokens", "block_size", "blocks", "attention", "window",
    "sinks", "oracle", "dtype", "executor", "backend", "attention_calls", "attention_calls_per_layer", "small_calls",
    "max_call_tokens", "graph_nodes", "graph_edges", "graph_depth", "forward_s", "wall_s", "tokens_per_s",
    "peak_rss_mb",
}
VERIFY_KEYS = {"reference_s", "max_abs_err", "max_rel_err", "tolerance", "verified"}


def run_json(capsys, *args) -> dict:
    """`emulate run ... --json` in-process: exit 0 and exactly one JSON object on stdout."""
    assert main(["run", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    summary = json.loads(out)
    assert isinstance(summary, dict)
    return summary


def save_tokens(path: Path, ids) -> Path:
    np.save(path, np.asarray(ids, dtype=np.int64))
    return path


def read_output(path: Path) -> pa.Table:
    with pa.ipc.open_file(path) as reader:
        return reader.read_all()


def reference_logprobs(model_name: str, tokens, dtype=torch.float64, **pattern):
    config, weights = preset(model_name)
    model = Transformer(config, weights, dtype=dtype)
    patterns = resolve_patterns(config, pattern.get("attention", "auto"), pattern.get("window"), pattern.get("sinks"))
    with torch.no_grad():
        return reference_forward(model, torch.as_tensor(tokens), patterns)


# -- the default run, as a user starts it ---------------------------------------------------

def test_default_run_in_a_real_process_is_verified_and_long_enough():
    out = subprocess.run([str(EMULATE), "run", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=CHILD_ENV)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.count("\n") == 1
    s = json.loads(out.stdout)
    assert SUMMARY_KEYS | VERIFY_KEYS <= set(s)
    # the real SmolLM2-135M on the shipped English text (tests/test_gguf.py checks it against transformers)
    assert (s["model"], s["input"], s["backend"]) == ("smollm2-135m", DEFAULT_TEXT_NAME, "graph")
    assert s["tokens"] >= 2048 and 5 < s["perplexity"] < 30 and s["max_logprob_err"] <= 1e-4
    assert s["blocks"] >= 16 and s["blocks"] == -(-s["tokens"] // s["block_size"])
    assert s["oracle"] == "kernel" and s["executor"] == "local" and s["dtype"] == "float32"
    assert s["attention"] == "causal" and s["window"] is None and s["sinks"] is None
    B = s["blocks"]
    assert s["attention_calls_per_layer"] == [B * (B + 1) // 2] * s["layers"]
    assert s["attention_calls"] == sum(s["attention_calls_per_layer"])
    assert s["attention_calls"] < s["small_calls"] == s["graph_nodes"] < s["graph_edges"]
    assert s["max_call_tokens"] == s["block_size"]
    assert s["graph_depth"] == 2 + 4 * s["layers"]
    assert 0 < s["max_rel_err"] <= 2e-5 and 0 < s["max_abs_err"] < 1e-3
    assert 0 < s["forward_s"] <= s["wall_s"] and s["reference_s"] > 0
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["forward_s"], rel=0.01)
    assert 50 < s["peak_rss_mb"] < 4000


def test_human_summary_names_the_measured_error(capsys):
    assert main(["run", "--random-tokens", "40", "--block-size", "16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "max_rel_err" in out and "B = 3 blocks of M = 16" in out
    assert not out.lstrip().startswith("{")


# -- the JSON summary -----------------------------------------------------------------------

@pytest.mark.parametrize("args,attention,window,sinks", [
    (["--model", "tiny-llama"], "causal", None, None),
    (["--model", "tiny-mistral"], "sliding", 512, None),
    (["--model", "tiny-mistral", "--window", "9"], "sliding", 9, None),
    (["--model", "tiny-llama", "--attention", "sink", "--window", "7", "--sinks", "3"], "sink", 7, 3),
    (["--model", "tiny-bert"], "full", None, None),
    (["--model", "tiny-bert", "--attention", "sampled"], "sampled", None, None),
])
def test_summary_reports_the_resolved_pattern_and_the_graph_counts(capsys, args, attention, window, sinks):
    s = run_json(capsys, *args, "--random-tokens", 53, "--block-size", 16, "--verify")
    assert SUMMARY_KEYS | VERIFY_KEYS <= set(s)
    assert (s["attention"], s["window"], s["sinks"]) == (attention, window, sinks)
    assert (s["tokens"], s["block_size"], s["blocks"]) == (53, 16, 4)
    assert s["max_call_tokens"] <= 16
    assert s["attention_calls"] == sum(s["attention_calls_per_layer"]) <= s["attention_calls_bound"]
    if attention == "sampled":  # verify's bound from N and M (the ragged last block's 5 keys), and met
        assert s["attention_calls_per_layer"] == [4] * 4 and s["tolerance"] == sampled_tolerance(53, 16, torch.float32)
        assert 0 < s["max_rel_err"] <= s["tolerance"] and s["verified"]
    else:
        assert s["max_rel_err"] <= 2e-5


def test_float64_run_meets_the_float64_contract(capsys):
    s = run_json(capsys, "--random-tokens", 70, "--block-size", 16, "--attention", "sink", "--window", "20",
                 "--sinks", "18", "--dtype", "float64", "--verify")
    assert s["dtype"] == "float64" and s["max_rel_err"] <= 1e-10 and s["max_logprob_err"] <= 1e-10


def test_json_has_no_error_keys_without_verify(capsys):
    s = run_json(capsys, "--random-tokens", 20, "--block-size", 8)
    assert SUMMARY_KEYS <= set(s) and not (VERIFY_KEYS & set(s)) and "output" not in s


def test_edge_sizes_run(capsys):
    for n, m in ((1, 16), (5, 16), (7, 1), (17, 16)):
        s = run_json(capsys, "--random-tokens", n, "--block-size", m, "--verify")
        assert s["blocks"] == -(-n // m) and s["max_call_tokens"] == min(n, m) and s["max_rel_err"] <= 2e-5


# -- the Arrow output -----------------------------------------------------------------------

def test_output_file_holds_positions_tokens_and_reference_logprobs(capsys, tmp_path):
    ids = np.random.default_rng(1).integers(0, 1024, 61)
    out = tmp_path / "out.arrow"
    s = run_json(capsys, "--input", save_tokens(tmp_path / "in.npy", ids), "--block-size", 16, "--dtype", "float64",
                 "--output", out)
    assert s["output"] == str(out)
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "out.arrow"]  # no temporary file left behind
    t = read_output(out)
    assert t.schema.field("position").type == pa.int64() and t.schema.field("token").type == pa.int32()
    assert t.schema.field("logprob").type == pa.float64()
    assert "hidden" not in t.column_names
    assert t.column("position").to_pylist() == list(range(61))
    assert t.column("token").to_pylist() == ids.tolist()
    logprob = t.column("logprob")
    assert logprob.null_count == 1 and not logprob[0].is_valid
    ref = reference_logprobs("tiny-llama", ids)["logprob_next"].numpy()
    np.testing.assert_allclose(logprob.to_numpy(zero_copy_only=False)[1:], ref, rtol=1e-10, atol=1e-10)
    assert json.loads(t.schema.metadata[b"emulate"])["model"] == "tiny-llama"


@pytest.mark.parametrize("dtype,arrow_type", [("float32", pa.float32()), ("float64", pa.float64())])
def test_hidden_column_carries_the_run_dtype(capsys, tmp_path, dtype, arrow_type):
    out = tmp_path / "out.arrow"
    run_json(capsys, "--random-tokens", 37, "--block-size", 8, "--dtype", dtype, "--hidden", "--output", out)
    t = read_output(out)
    assert t.schema.field("logprob").type == arrow_type
    hidden = t.schema.field("hidden").type
    assert pa.types.is_fixed_size_list(hidden) and hidden.list_size == 256 and hidden.value_type == arrow_type
    config, weights = preset("tiny-llama")
    tokens = t.column("token").to_numpy().astype(np.int64)
    ref = reference_logprobs("tiny-llama", tokens, dtype=getattr(torch, dtype))["hidden"].double().numpy()
    got = np.stack(t.column("hidden").to_numpy(zero_copy_only=False)).astype(np.float64)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= (1e-10 if dtype == "float64" else 2e-5)


def test_encoder_output_has_hidden_and_no_logprob(capsys, tmp_path):
    out = tmp_path / "bert.arrow"
    run_json(capsys, "--model", "tiny-bert", "--random-tokens", 30, "--block-size", 8, "--output", out)
    t = read_output(out)
    assert t.column_names == ["position", "token", "hidden"] and t.num_rows == 30


def test_single_token_output_has_one_null_logprob(capsys, tmp_path):
    out = tmp_path / "one.arrow"
    run_json(capsys, "--random-tokens", 1, "--output", out)
    t = read_output(out)
    assert t.num_rows == 1 and t.column("logprob").null_count == 1


def test_logprob_carries_across_block_boundaries(capsys, tmp_path):
    # M = 1: every log-prob but the first is computed in the block before its own
    ids = [5, 900, 17, 17, 3, 1000, 42]
    out = tmp_path / "out.arrow"
    run_json(capsys, "--input", save_tokens(tmp_path / "in.npy", ids), "--block-size", 1, "--dtype", "float64",
             "--output", out)
    lp = read_output(out).column("logprob").to_numpy(zero_copy_only=False)[1:]
    np.testing.assert_allclose(lp, reference_logprobs("tiny-llama", ids)["logprob_next"].numpy(), rtol=1e-10)


def test_failure_mid_run_leaves_no_file(capsys, tmp_path, monkeypatch):
    from emulate import errors as config_module
    from emulate.runtime.runner import NodeRunner

    calls = {"n": 0}
    real = NodeRunner.run

    def failing(self, a, inputs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise config_module.EmulateError("simulated failure in a small call")
        return real(self, a, inputs)

    monkeypatch.setattr(NodeRunner, "run", failing)
    assert main(["run", "--random-tokens", "100", "--block-size", "8", "--output", str(tmp_path / "o.arrow")]) == 2
    assert capsys.readouterr().err.startswith("emulate: error: simulated failure")
    assert os.listdir(tmp_path) == []


# -- input formats ----------------------------------------------------------------------------

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3]


def write_input(kind: str, path_dir: Path) -> Path:
    table = pa.table({"token": pa.array(IDS, pa.int32()), "other": pa.array([0.5] * len(IDS))})
    if kind == "npy":
        return save_tokens(path_dir / "ids.npy", IDS)
    if kind == "arrow-file":
        p = path_dir / "ids.arrow"
        with pa.ipc.new_file(p, table.schema) as w:
            w.write_table(table)
        return p
    if kind == "arrow-stream":
        p = path_dir / "ids_stream.arrow"
        with pa.ipc.new_stream(p, table.schema) as w:
            w.write_table(table)
        return p
    if kind == "parquet":
        p = path_dir / "ids.parquet"
        pq.write_table(table, p)
        return p
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["npy", "arrow-file", "arrow-stream", "parquet"])
def test_token_files_are_read_in_order(capsys, tmp_path, kind):
    src = write_input(kind, tmp_path)
    out = tmp_path / "out.arrow"
    s = run_json(capsys, "--input", src, "--block-size", 4, "--output", out, "--verify")
    assert s["tokens"] == len(IDS) and s["max_rel_err"] <= 2e-5
    assert read_output(out).column("token").to_pylist() == IDS


def test_text_is_byte_level_for_presets(capsys, tmp_path):
    text = "Grüße, long context!\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    expected = list(text.encode("utf-8"))
    for source in (["--input", tmp_path / "t.txt"], ["--text", text]):
        out = tmp_path / "out.arrow"
        run_json(capsys, "--model", "tiny-llama", *source, "--block-size", 8, "--output", out)
        assert read_output(out).column("token").to_pylist() == expected
        out.unlink()


# -- emulate graph ----------------------------------------------------------------------------

def test_graph_json_reloads_to_the_compiled_graph(capsys, tmp_path):
    out = tmp_path / "g.json"
    args = ["graph", "--random-tokens", "100", "--block-size", "16", "--attention", "sink", "--window", "20",
            "--sinks", "4", "--format", "json", "-o", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "wrote" in captured.err
    g = from_json(out.read_text())
    c = counts(g)
    assert c["graph_nodes"] == g.number_of_nodes() and c["attention_calls_per_layer"] == [22] * 4
    assert [p["kind"] for p in g.graph["spec"]["patterns"]] == ["sink"] * 4
    assert os.listdir(tmp_path) == ["g.json"]


def test_graph_dot_round_trips_through_networkx(capsys, tmp_path):
    import networkx as nx

    out = tmp_path / "g.dot"
    assert main(["graph", "--random-tokens", "50", "--block-size", "16", "--format", "dot", "-o", str(out)]) == 0
    g = emulate.compile("tiny-llama", tokens=50, block_size=16)
    drawn = nx.nx_agraph.read_dot(out)  # Graphviz's own parser, bundled with pygraphviz
    assert set(drawn.nodes) == set(g.nodes)
    assert {(u, v) for u, v, _ in drawn.edges} == set(g.edges)


# -- bad input: one line on stderr, exit 2, no traceback, nothing left behind ------------------

def write_bad_files(d: Path) -> None:
    save_tokens(d / "empty.npy", [])
    save_tokens(d / "negative.npy", [4, -1, 7])
    save_tokens(d / "too_big.npy", [4, 1024, 7])
    save_tokens(d / "ok.npy", list(range(30)))
    np.save(d / "floats.npy", np.array([1.0, 2.0]))
    np.save(d / "matrix.npy", np.zeros((3, 4), dtype=np.int64))
    (d / "empty.txt").write_bytes(b"")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "garbage.arrow").write_bytes(b"this is not arrow")
    (d / "garbage.parquet").write_bytes(b"PAR1 nope")
    (d / "pickled.npy").write_bytes(b"\x93NUMPY garbage")
    (d / "folder.npy").mkdir()
    (d / "tokens.csv").write_text("1,2,3\n")
    pq.write_table(pa.table({"ids": [1, 2, 3]}), d / "no_token.parquet")
    pq.write_table(pa.table({"token": [1.0, 2.0]}), d / "float_token.parquet")
    pq.write_table(pa.table({"token": pa.array([], pa.int64())}), d / "empty.parquet")
    pq.write_table(pa.table({"token": pa.array([1, None, 3], pa.int64())}), d / "null_token.parquet")
    with pa.ipc.new_file(d / "no_token.arrow", pa.schema([("tok", pa.int64())])) as w:
        w.write_table(pa.table({"tok": [1, 2]}))
    with pa.ipc.new_stream(d / "string_token.arrow", pa.schema([("token", pa.string())])) as w:
        w.write_table(pa.table({"token": ["a", "b"]}))
    with pa.ipc.new_file(d / "oov.arrow", pa.schema([("token", pa.int32())])) as w:
        w.write_table(pa.table({"token": pa.array([1, 5000], pa.int32())}))


def bad_inputs(d: Path) -> dict[str, list]:
    """Each bad input of the CLI contract, as `emulate run` arguments over the files in `d`."""
    ok = ["--input", d / "ok.npy"]
    return {
        "missing input": ["--input", d / "missing.npy"],
        "missing text input": ["--input", d / "missing.txt"],
        "input is a folder": ["--input", d / "folder.npy"],
        "unknown input format": ["--input", d / "tokens.csv"],
        "corrupt arrow": ["--input", d / "garbage.arrow"],
        "corrupt parquet": ["--input", d / "garbage.parquet"],
        "corrupt npy": ["--input", d / "pickled.npy"],
        "text not utf-8": ["--input", d / "latin1.txt"],
        "empty npy": ["--input", d / "empty.npy"],
        "empty parquet": ["--input", d / "empty.parquet"],
        "empty text file": ["--input", d / "empty.txt"],
        "empty --text": ["--text", ""],
        "zero random tokens": ["--random-tokens", "0"],
        "negative random tokens": ["--random-tokens", "-3"],
        "negative token id": ["--input", d / "negative.npy"],
        "token id past the vocabulary": ["--input", d / "too_big.npy"],
        "token id past the vocabulary (arrow)": ["--input", d / "oov.arrow"],
        "float npy": ["--input", d / "floats.npy"],
        "2-d npy": ["--input", d / "matrix.npy"],
        "no token column (parquet)": ["--input", d / "no_token.parquet"],
        "no token column (arrow)": ["--input", d / "no_token.arrow"],
        "float token column": ["--input", d / "float_token.parquet"],
        "string token column": ["--input", d / "string_token.arrow"],
        "null token": ["--input", d / "null_token.parquet"],
        "block size 0": [*ok, "--block-size", "0"],
        "negative block size": [*ok, "--block-size", "-16"],
        "block size not a number": [*ok, "--block-size", "abc"],
        "window 0 with auto": [*ok, "--window", "0"],
        "window 0 on mistral": [*ok, "--model", "tiny-mistral", "--window", "0"],
        "negative window": [*ok, "--attention", "sliding", "--window", "-4"],
        "sliding without a window": [*ok, "--attention", "sliding"],
        "sink without a window": [*ok, "--attention", "sink", "--sinks", "4"],
        "sinks 0": [*ok, "--attention", "sink", "--window", "8", "--sinks", "0"],
        "sink without sinks": [*ok, "--attention", "sink", "--window", "8"],
        "sinks on a causal pattern": [*ok, "--sinks", "4"],
        "window on full attention": [*ok, "--attention", "full", "--window", "4"],
        "window on an encoder": ["--model", "tiny-bert", "--random-tokens", "20", "--window", "4"],
        "unknown preset": [*ok, "--model", "tiny-gpt9"],
        "unknown attention pattern": [*ok, "--attention", "banded"],
        "unknown dtype": [*ok, "--dtype", "float8"],
        "sampled on a causal model": [*ok, "--attention", "sampled"],
        "sampled on mistral": [*ok, "--model", "tiny-mistral", "--attention", "sampled"],
        "past tiny-bert's learned positions": ["--model", "tiny-bert", "--random-tokens", "8193"],
        "two inputs": [*ok, "--text", "hello"],
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("inputs"))))
@pytest.mark.parametrize("command", ["run", "graph"])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case, command):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_bad_files(inputs)
    args = [str(a) for a in bad_inputs(inputs)[case]]
    outdir = tmp_path / "out"
    outdir.mkdir()
    target = outdir / ("out.arrow" if command == "run" else "g.json")
    code = main([command, *args, "--output", str(target)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("emulate: error: "), captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert os.listdir(outdir) == []


@pytest.mark.parametrize("command", ["run", "graph"])
def test_missing_output_directory_is_refused(capsys, tmp_path, command):
    target = tmp_path / "no" / "such" / "dir" / "out.arrow"
    assert main([command, "--random-tokens", "20", "--block-size", "8", "--output", str(target)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("emulate: error: output directory")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["run", "graph"])
def test_output_path_that_is_a_directory_is_refused_before_the_run(capsys, tmp_path, command):
    (tmp_path / "taken").mkdir()
    assert main([command, "--random-tokens", "20", "--block-size", "8", "--output", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("emulate: error: ")
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(tmp_path / "taken") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_input_is_refused(capsys, tmp_path):
    p = save_tokens(tmp_path / "secret.npy", [1, 2, 3])
    p.chmod(0)
    assert main(["run", "--input", str(p)]) == 2
    assert capsys.readouterr().err.startswith("emulate: error: ")


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    out = subprocess.run([str(EMULATE), "run", "--input", str(tmp_path / "nope.npy"), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=CHILD_ENV)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("emulate: error: ")


def test_graph_counts_equal_the_builder(capsys, tmp_path):
    """`emulate graph` and `emulate run` read the same graph off the same options."""
    out = tmp_path / "g.json"
    assert main(["graph", "--model", "tiny-mistral", "--random-tokens", "300", "--block-size", "32",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    s = run_json(capsys, "--model", "tiny-mistral", "--random-tokens", 300, "--block-size", 32)
    g = from_json(out.read_text())
    c = counts(g)
    for key in ("attention_calls", "attention_calls_per_layer", "graph_nodes", "graph_edges", "graph_depth"):
        assert c[key] == s[key]
    assert counts(build_graph_from(g)) == c


def build_graph_from(g):
    from graphs import ForwardSpec, Pattern

    spec = dict(g.graph["spec"])
    spec["patterns"] = tuple(Pattern(**p) for p in spec["patterns"])
    return build_graph(ForwardSpec(**spec))


@pytest.mark.parametrize("option", [["--workers", "2"], ["--cpus-per-worker", "2"], ["--gpus-per-worker", "1"],
                                    ["--address", "auto"], ["--stall-timeout", "5"]])
def test_a_ray_option_on_a_local_run_is_refused_not_ignored(capsys, tmp_path, option):
    target = tmp_path / "out.arrow"
    assert main(["run", "--random-tokens", "20", "--block-size", "8", *option, "--output", str(target)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"emulate: error: {option[0]} is not an option of the local executor: add --executor ray, or drop it"]
    assert os.listdir(tmp_path) == []


# -- help a newcomer can follow -----------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["run"], ["generate"], ["graph"], ["theorems"], ["submit"], ["cluster"]])
def test_help_names_defaults_and_an_example(capsys, command):
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "example" in text
    if command in ([], ["run"], ["generate"], ["graph"]):
        from emulate.models.presets import PRESETS

        assert all(name in text for name in PRESETS)  # the presets are named where a model is chosen
    if command == ["run"]:
        for default in ("(default: 256)", "(default: float32)", "(default: local)", "(default: kernel)",
                        "default 600", "default 1)"):
            assert default in text, default


def test_version_is_the_installed_one():
    out = subprocess.run([str(EMULATE), "--version"], capture_output=True, text=True, timeout=60)
    from emulate import __version__

    assert out.returncode == 0 and out.stdout.strip() == f"emulate {__version__}"


def test_generate_and_run_declare_the_problem_options_once(capsys):
    """emulate/cli/options.py, add_problem_options: generate takes a prompt (no --random-tokens), with the same
    --window and --sinks as run and its own words for --seed, -M and --attention."""
    helps = {}
    for command in ("run", "generate"):
        assert main([command, "--help"]) == 0
        helps[command] = " ".join(capsys.readouterr().out.split())
    run, generate = helps["run"], helps["generate"]
    assert "--random-tokens" in run and "--random-tokens" not in generate
    for words in ("--window WINDOW sliding window r: query i sees keys i-r+1..i",
                  "--sinks SINKS attention sinks s: the first s tokens stay visible"):
        assert words in run and words in generate
    assert "--seed SEED seeds the sampling's random draws" in generate
    assert "--seed SEED seeds random tokens and the sampled permutation" in run
    assert "M: the most keys a small call sees" in generate and "M: the most tokens a small call sees" in run
    assert "--text TEXT the prompt as text" in generate and "of a decoder (default smollm2-135m)" in generate
