"""Hostile input files and sizes, on real files: absurd plans, broken or lying config.json, GGUF and
checkpoint files, traces with fields of the wrong type, a corrupt calibration cache, full disks,
over-long and non-ASCII output names, and inputs whose message would mislead. Each is one line
(the CLI: stderr, exit 2, no traceback; the library: EmulateError) and leaves nothing half-written."""
from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_hardening import CHILD_ENV, EMULATE, emulate_child, one_error_line

from emulate.cli import main
from emulate.errors import EmulateError

SMALL = ["--random-tokens", "64", "-M", "16"]


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err)


# -- plans past what can be held or simulated ---------------------------------------------------------

@pytest.mark.parametrize("args, said", [(["--tokens", str(10**13)], "more than a plan simulates"),
                                        (["--workers", str(10**9)], "at most 1,000,000 workers"),
                                        (["-M", "1", "--tokens", "100000"], "more than a plan simulates"),
                                        (["--tokens", str(10**8), "--attention", "sliding", "--window", "256"],
                                         "tasks over 4 layers")])
def test_an_absurd_plan_is_refused_before_anything_is_built(args, said):
    start = time.monotonic()
    done = emulate_child("plan", *args, "--device", "h100", timeout=60)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert said in one_error_line(done.stderr)
    assert time.monotonic() - start < 30  # start-up (a few seconds), then the refusal from the shapes alone


def test_a_plan_that_fits_the_bounds_but_not_the_memory_is_refused(monkeypatch):
    """The memory check (emulate/runtime/memory.py, check_fits) prices the plan's tasks, calls and workers."""
    import psutil

    from emulate.planner import predict

    class Scarce:
        available = 10**5  # 100 kB: the plan of 4096 tokens prices at about 0.5 MB

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    with pytest.raises(EmulateError, match="this plan would hold about"):
        predict(None, 4096, block_size=256, device="h100")


# -- config.json ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from hf_models import checkpoint

    return checkpoint("llama", tmp_path_factory.mktemp("ckpt"))[1]


def with_config(src: Path, dst: Path, change=None, text: str | None = None) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    if change:
        config.update(change)
    (dst / "config.json").write_text(text if text is not None else json.dumps(config))
    return dst


BAD_CONFIGS = {
    "hidden_act list": ({"hidden_act": ["silu"]}, "unsupported activation"),
    "rope_type list": ({"rope_parameters": {"rope_theta": 1e4, "rope_type": ["default"]}}, "rope_type"),
    "hidden_size string": ({"hidden_size": "64"}, "positive integer"),
    "layers null": ({"num_hidden_layers": None}, "lacks 'num_hidden_layers'"),
    "layers 1e8": ({"num_hidden_layers": 10**8}, "past any real model's"),
    "layers 1e400": ({"num_hidden_layers": 10**400}, "past any real model's"),
    "layers float": ({"num_hidden_layers": 2.0}, "positive integer"),
    "vocab 1e12": ({"vocab_size": 10**12}, "past any real model's"),
    "rms_norm_eps inf": ({"rms_norm_eps": float("inf")}, "positive number, got"),
    "rms_norm_eps nan": ({"rms_norm_eps": float("nan")}, "positive number, got"),
    "rope_theta inf": ({"rope_parameters": {"rope_theta": float("inf"), "rope_type": "default"}}, "positive number, got"),
    "rope factor inf": ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": float("inf")}},
                        "positive number, got"),
    "heads 0": ({"num_attention_heads": 0}, "positive integer"),
    "kv heads -1": ({"num_key_value_heads": -1}, "positive integer"),
    "head_dim 0": ({"head_dim": 0}, "positive integer"),
    "heads not dividing hidden_size": ({"num_attention_heads": 5, "head_dim": None}, "does not split over 5 heads"),
    "heads not grouping": ({"num_attention_heads": 3}, "do not group"),
    "intermediate negative": ({"intermediate_size": -5}, "positive integer"),
    "attention_bias string": ({"attention_bias": "yes"}, "true or false"),
    "tie_word_embeddings list": ({"tie_word_embeddings": [1]}, "true or false"),
    "more layers than the weights": ({"num_hidden_layers": 3}, "declares 3 layers"),
    "weights past the memory": ({"hidden_size": 2**22, "num_attention_heads": 2**14, "num_key_value_heads": 2**14,
                                 "head_dim": 256, "intermediate_size": 2**22}, "would hold about"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_json_is_one_line(llama_dir, tmp_path, name):
    from emulate.models.loaders import load

    change, said = BAD_CONFIGS[name]
    path = with_config(llama_dir, tmp_path / "m", change)
    with pytest.raises(EmulateError, match=said) as err:
        load(str(path))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_json_nested_100000_deep_is_one_line(llama_dir, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    config = with_config(llama_dir, tmp_path / "config", text=deep)
    assert "nested too deep" in refused(capsys, ["run", "--model", str(config), *SMALL])
    index = with_config(llama_dir, tmp_path / "index")
    (index / "model.safetensors").rename(index / "model-00001.safetensors")
    (index / "model.safetensors.index.json").write_text(deep)
    assert "nested too deep" in refused(capsys, ["run", "--model", str(index), *SMALL])


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_a_weight_map_leading_out_of_the_checkpoint_is_refused(llama_dir, tmp_path, shard):
    from emulate.models.loaders import load

    path = with_config(llama_dir, tmp_path / "m")
    shutil.copy(path / "model.safetensors", tmp_path / "outside.safetensors")  # a real file there: refused all the same
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(EmulateError, match="outside the checkpoint directory"):
        load(str(path))


# -- GGUF ---------------------------------------------------------------------------------------------

def write_gguf(path: Path, block_count: int = 2, merges=("Ġ t", "h e"), layers_held: int = 2) -> None:
    """A small llama GGUF (F32 tensors) whose metadata can lie about its layers or carry bad merges."""
    gguf = pytest.importorskip("gguf")
    import emulate.models.gguf as reader

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", block_count), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 512),
                       ("vocab_size", 258)):
        w.add_uint32("llama." + key, value)
    spelling = reader._bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([spelling[b] for b in range(256)] + ["Ġt", "he"])
    w.add_token_merges(list(merges))
    shapes = {"token_embd.weight": (258, 64), "output_norm.weight": (64,)}
    for i in range(layers_held):
        shapes.update({f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.ffn_norm.weight": (64,),
                       f"blk.{i}.attn_q.weight": (64, 64), f"blk.{i}.attn_k.weight": (32, 64),
                       f"blk.{i}.attn_v.weight": (32, 64), f"blk.{i}.attn_output.weight": (64, 64),
                       f"blk.{i}.ffn_gate.weight": (96, 64), f"blk.{i}.ffn_up.weight": (96, 64),
                       f"blk.{i}.ffn_down.weight": (64, 96)})
    for name, shape in shapes.items():
        w.add_tensor(name, np.full(shape, 0.01, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind, said", [("merges", "does not fit its vocabulary"), ("merge shape", "not two tokens"),
                                        ("layers", "past any real model's"), ("held", "more than the")])
def test_a_lying_gguf_is_one_line(tmp_path, capsys, kind, said):
    path = tmp_path / "m.gguf"
    if kind == "merges":
        write_gguf(path, merges=("Ġ t", "x ZZZ-not-a-token"))
    elif kind == "merge shape":
        write_gguf(path, merges=("Ġ t", "one two three"))
    elif kind == "layers":
        write_gguf(path, block_count=10**8)
    else:
        write_gguf(path, block_count=3)
    assert said in refused(capsys, ["run", "--model", str(path), *SMALL])


def test_the_written_gguf_loads_when_it_tells_the_truth(tmp_path, capsys):
    """The refusals above come from what was changed, not from a broken writer."""
    write_gguf(tmp_path / "m.gguf")
    assert main(["run", "--model", str(tmp_path / "m.gguf"), *SMALL, "--json"]) == 0, capsys.readouterr().err


# -- traces ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_trace(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("trace") / "t.json"
    assert main(["run", "--random-tokens", "128", "-M", "32", "--trace", str(path), "--quiet"]) == 0
    return json.loads(path.read_text())


def _complete(d):
    return [e for e in d["traceEvents"] if e.get("ph") == "X"]


def _meta(d):
    return [e for e in d["traceEvents"] if e.get("ph") == "M"]


TRACE_CHANGES = {
    "tid a list": lambda d: _complete(d)[0].__setitem__("tid", [1]),
    "tid an object": lambda d: _complete(d)[0].__setitem__("tid", {"a": 1}),
    "ts missing": lambda d: _complete(d)[0].pop("ts"),
    "ts a string": lambda d: _complete(d)[0].__setitem__("ts", "5"),
    "ts 1e308": lambda d: _complete(d)[0].__setitem__("ts", 1e308),
    "args a list": lambda d: _complete(d)[0].__setitem__("args", [1]),
    "task a list": lambda d: _complete(d)[0]["args"].__setitem__("task", [1]),
    "deps of objects": lambda d: _complete(d)[1]["args"].__setitem__("deps", [{"a": 1}]),
    "metadata args a list": lambda d: _meta(d)[0].__setitem__("args", [1]),
    "sort index a list": lambda d: _meta(d)[2]["args"].__setitem__("sort_index", [1]),
}


@pytest.mark.parametrize("name", [*TRACE_CHANGES, "ts of 5000 digits"])
def test_trace_fields_of_the_wrong_type_are_one_line(good_trace, tmp_path, capsys, name):
    d = copy.deepcopy(good_trace)
    if name == "ts of 5000 digits":
        _complete(d)[0]["ts"] = 424242
        text = json.dumps(d).replace("424242", "9" * 5000)
    else:
        TRACE_CHANGES[name](d)
        text = json.dumps(d)
    (tmp_path / "t.json").write_text(text)
    refused(capsys, ["trace", str(tmp_path / "t.json"), "-o", str(tmp_path / "g.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


# -- the planner's calibration cache --------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["{not json", "[1, 2]", "[" * 100_000, '{"format": 2, "matmul_flops": "fast"}',
                                   '{"format": 2, "matmul_flops": [[1, 2]], "bandwidth": null}', "\udcff"])
def test_a_corrupt_calibration_cache_is_measured_again_with_one_note(tmp_path, monkeypatch, cache):
    """A cache cut short, edited or written by another program costs a measurement, never a failure."""
    from test_planner import FAKE, fake_calibration

    from emulate.planner import calibrate

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "calibrate_cpu", fake_calibration)
    path = calibrate.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(cache, errors="surrogateescape")
    notes: list[str] = []
    device = calibrate.cpu_device(note=notes.append)
    assert device.call_overhead_s == FAKE["call_overhead_s"]
    assert len(notes) == 1 and "measuring again" in notes[0], notes
    assert json.loads(path.read_text())["format"] == calibrate.CACHE_FORMAT  # rewritten whole
    calibrate.cpu_device(note=notes.append)
    assert len(notes) == 1  # the rewritten cache is read without a note


# -- writers on a full disk -----------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (as root); skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield disk
    finally:  # a file a failed writer left open keeps the mount busy: detach it lazily then
        if subprocess.run(["umount", str(disk)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=True)


FULL_DISK_WRITERS = {
    "run --output": lambda d: ["run", "--random-tokens", "4096", "-M", "256", "--hidden", "--quiet", "-o", d / "o.arrow"],
    "run --trace": lambda d: ["run", "--random-tokens", "4096", "-M", "64", "--quiet", "--trace", d / "t.json"],
    "graph -o json": lambda d: ["graph", "--random-tokens", "4096", "-M", "64", "--quiet", "-o", d / "g.json"],
    "graph --coverage": lambda d: ["graph", "--random-tokens", "4096", "-M", "64", "--coverage", d / "c.png"],
    "theorems --plot": lambda d: ["theorems", "--max-tokens", "32", "-M", "16", "--results", "full", "--quiet", "--plot",
                                  d / "p.png"],
}


@pytest.mark.parametrize("name", list(FULL_DISK_WRITERS))
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk, capsys, name):
    (tiny_disk / "keep.txt").write_bytes(b"stood here before" * 3000)  # 51 kB of the 64: a picture no longer fits
    line = refused(capsys, [str(a) for a in FULL_DISK_WRITERS[name](tiny_disk)])
    assert "No space left on device" in line, line
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["keep.txt"]


def _file_size_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the child


@pytest.mark.parametrize("argv", [["run", "--random-tokens", "4096", "-M", "256", "--hidden", "-o", "o.arrow"],
                                  ["graph", "--random-tokens", "4096", "-M", "64", "-o", "g.json"]])
def test_a_file_size_limit_in_a_child_is_one_line(tmp_path, argv):
    """The same path without root: RLIMIT_FSIZE makes the writer's own write() fail, as a full disk would."""
    done = subprocess.run([str(EMULATE), *argv, "--quiet"], capture_output=True, text=True, timeout=120, check=False,
                          env=CHILD_ENV, cwd=tmp_path, preexec_fn=_file_size_limit)
    assert done.returncode == 2, done.stderr
    assert "File too large" in one_error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []


# -- output names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["run", *SMALL, "-o", "{}.arrow"], ["run", *SMALL, "--trace", "{}.json"],
                                  ["graph", *SMALL, "-o", "{}.json"], ["graph", *SMALL, "--coverage", "{}.png"],
                                  ["plan", "--device", "h100", "--plot", "{}.png"]])
@pytest.mark.parametrize("length", [300, 250])  # past NAME_MAX; within it, but not with the temporary suffix
def test_a_file_name_longer_than_the_os_allows_is_one_line(tmp_path, capsys, argv, length):
    argv = [a.format(tmp_path / ("x" * length)) if "{}" in a else a for a in argv]
    assert "File name too long" in refused(capsys, argv)
    assert list(tmp_path.iterdir()) == []


C_LOCALE = {k: v for k, v in CHILD_ENV.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")}
C_LOCALE.update(LC_ALL="C", PYTHONUTF8="0")


@pytest.mark.parametrize("argv, written", [(["run", *SMALL, "-o", "é.arrow"], True),
                                           (["graph", *SMALL, "-o", "é.json"], True),
                                           (["run", *SMALL, "-o", "missing-dir/é.arrow"], False)])
def test_a_non_ascii_output_name_under_the_c_locale(tmp_path, argv, written):
    done = subprocess.run([str(EMULATE), *argv], capture_output=True, timeout=120, env=C_LOCALE, cwd=tmp_path, check=False)
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err
    if written:
        assert done.returncode == 0 and os.listdir(tmp_path) == [argv[-1]], err
    else:
        assert done.returncode == 2 and "does not exist" in one_error_line(err)


# -- messages that must not mislead ---------------------------------------------------------------------

def test_a_uint64_id_past_int64_is_named_with_its_value(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([1, 2, 2**63 + 5], dtype=np.uint64))
    assert "token id 9223372036854775813" in refused(capsys, ["run", "--input", str(tmp_path / "ids.npy")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"token": pa.array([1, 2**64 - 1], pa.uint64())}), tmp_path / "ids.parquet")
    assert "token id 18446744073709551615" in refused(capsys, ["run", "--input", str(tmp_path / "ids.parquet")])


def test_an_object_npy_is_refused_as_objects_not_as_truncated(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    line = refused(capsys, ["run", "--input", str(tmp_path / "ids.npy")])
    assert "Python objects" in line and "pickle" in line and "truncated" not in line


def test_a_dangling_output_link_is_named_a_dangling_link(tmp_path, capsys):
    (tmp_path / "out.arrow").symlink_to("/nonexistent-dir/out.arrow")
    assert "dangling symlink" in refused(capsys, ["run", *SMALL, "-o", str(tmp_path / "out.arrow")])
    assert os.readlink(tmp_path / "out.arrow") == "/nonexistent-dir/out.arrow"


def test_one_file_for_two_outputs_is_refused(tmp_path, capsys):
    same = tmp_path / "same.json"
    (tmp_path / "link.json").symlink_to(same)
    assert "same file" in refused(capsys, ["run", *SMALL, "-o", str(same), "--trace", str(same)])
    assert "same file" in refused(capsys, ["run", *SMALL, "-o", str(same), "--trace", str(tmp_path / "link.json")])
    assert "same file" in refused(capsys, ["graph", *SMALL, "-o", str(tmp_path / "c.png"), "--coverage",
                                           str(tmp_path / "c.png")])
    assert "same file" in refused(capsys, ["trace", str(same), "-o", str(same)])
    np.save(tmp_path / "ids.npy", np.arange(10))
    assert "same file" in refused(capsys, ["run", "--input", str(tmp_path / "ids.npy"), "-o", str(tmp_path / "ids.npy")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy", "link.json"]


def test_compare_without_coverage_is_refused(capsys):
    assert "--compare draws with --coverage" in refused(capsys, ["graph", *SMALL, "-o", "/tmp/x.json",
                                                                 "--compare", "full,causal"])


# -- the transformers backend's own load errors ---------------------------------------------------------

@pytest.mark.parametrize("kind, said", [("pickle only", "must be safetensors"), ("truncated", "deserializing header"),
                                        ("size mismatch", "mismatch model.layers"),
                                        ("missing tensor", "does not hold every weight")])
def test_a_checkpoint_transformers_cannot_load_is_one_line(llama_dir, tmp_path, kind, said):
    import torch
    from safetensors.torch import load_file, save_file

    import emulate

    path = with_config(llama_dir, tmp_path / "m", {"intermediate_size": 96} if kind == "size mismatch" else None)
    weights = path / "model.safetensors"
    if kind == "pickle only":
        torch.save(load_file(weights), path / "pytorch_model.bin")
        weights.unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "missing tensor":
        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(EmulateError, match=said) as err:
        emulate.run(str(path), random_tokens=64, block_size=16, backend="transformers", collect=False)
    assert "\n" not in str(err.value)
