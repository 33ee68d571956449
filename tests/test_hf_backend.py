"""Route 1 of "bring your own model": transformers models with attn_implementation="emulate".

Every attention call runs as the graph's pair calls (emulate/hf/attention.py); the rest of the model is
transformers' own. Each family's seeded small model is compared with itself under sdpa on N = 300
tokens in blocks of M = 64 (five blocks, the last one ragged), in float32 (<= 2e-5) and float64
(<= 1e-10; the fixture below makes transformers' float32 RMSNorm upcasts follow float64, since both
runs share them and their rounding would otherwise hide the attention's difference). The pair-call
counts are checked against the task graph's, and what cannot be honoured exactly is refused.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import record_error, row_errors
from hf_models import FAMILIES, SMALL, VOCAB, checkpoint, seeded

import emulate
import emulate.hf as hf
from emulate.errors import EmulateError
from graphs import Pattern, counts

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
N, M = 300, 64
BLOCKS = 5  # ceil(300 / 64), the last block 44 tokens

# family -> (model class, config class, config, the patterns its layers run)
C, S40 = Pattern("causal"), Pattern("sliding", window=40)
HF_FAMILIES = {
    # q/k norms, layer 0 full and layer 1 sliding (max_window_layers = 1)
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(SMALL, head_dim=16, use_sliding_window=True, sliding_window=48, max_window_layers=1),
              [C, Pattern("sliding", window=48)]),
    # (1 + w) norms, scaled embeddings, head_dim 16
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, dict(SMALL, head_dim=16), [C, C]),
    # fused qkv, a window longer than M and not a multiple of it
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config, dict(SMALL, sliding_window=72),
             [Pattern("sliding", window=72)] * 2),
    # post-norms and q/k norms over all heads
    "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config, dict(SMALL), [C, C]),
    # NoPE on some layers
    "smollm3": (transformers.SmolLM3ForCausalLM, transformers.SmolLM3Config, dict(SMALL, no_rope_layer_interval=2),
                [C, C]),
    # mixture of experts, sliding window 40
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                dict(SMALL, sliding_window=40, num_local_experts=4, num_experts_per_tok=2), [S40, S40]),
    # soft-capping turned off (the default is refused: test_refuses_softcap)
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
               dict(SMALL, head_dim=16, sliding_window=40, attn_logit_softcapping=None,
                    layer_types=["sliding_attention", "full_attention"]), [S40, C]),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
               dict(SMALL, head_dim=16, sliding_window=40, layer_types=["sliding_attention", "full_attention"]),
               [S40, C]),
    # the families the checkpoint loader maps too (tests/hf_models.py)
    "llama": (*FAMILIES["llama"], [C, C]),
    "mistral": (*FAMILIES["mistral"], [S40, S40]),
    "qwen2": (*FAMILIES["qwen2"], [C, Pattern("sliding", window=48)]),
    "gpt2": (*FAMILIES["gpt2"], [C, C]),
    "bert": (*FAMILIES["bert"], [Pattern("full")] * 2),
}


@pytest.fixture(autouse=True)
def registered():
    hf.register(block_size=M)
    yield
    hf.reset()


@pytest.fixture
def sdpa_for_gemma2(monkeypatch):
    """Gemma2 turns sdpa off only because sdpa cannot soft-cap; with soft-capping off it is the plain reference."""
    monkeypatch.setattr(transformers.Gemma2PreTrainedModel, "_supports_sdpa", True)


def float64_norms(model, monkeypatch) -> None:
    """Make every RMSNorm of the model compute in its input dtype (transformers computes them in float32)."""

    def plain(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def gemma(self, x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)

    for cls in {type(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}:
        monkeypatch.setattr(cls, "forward", gemma if cls.__name__.startswith("Gemma") else plain)


def build(family: str, **overrides):
    cls, config_cls, kwargs, patterns = HF_FAMILIES[family]
    config = config_cls(**{**kwargs, **overrides})
    extra = {"experts_implementation": "eager"} if family == "mixtral" else {}  # grouped_mm is float32 only
    return seeded(cls._from_config(config, attn_implementation="sdpa", **extra)), patterns


def forward(model, ids, implementation: str) -> dict:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    got = {"hidden": out.hidden_states[-1][0] if hasattr(out, "logits") else out.last_hidden_state[0]}
    if hasattr(out, "logits"):
        got["logits"] = out.logits[0]
    return got


def tokens(n=N, seed=7, batch=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_matches_sdpa(family, dtype, request, monkeypatch):
    if family == "gemma2":
        request.getfixturevalue("sdpa_for_gemma2")
    model, patterns = build(family)
    model = model.to(dtype)
    if dtype == torch.float64:
        float64_norms(model, monkeypatch)
    ids = tokens()
    want = forward(model, ids, "sdpa")
    hf.reset()
    got = forward(model, ids, "emulate")
    c = hf.counts()
    # every layer ran as pair calls, with the layer's own mask
    assert [c["patterns"][layer] for layer in range(2)] == [p.describe() for p in patterns]
    assert c["blocks"] == {0: BLOCKS, 1: BLOCKS} or family == "gpt2" and list(c["blocks"].values()) == [BLOCKS] * 2
    assert c["max_call_tokens"] == M
    rel = max(row_errors(got[k], want[k])[1] for k in want)
    record_error(f"{family} (attn_implementation=emulate)", patterns, "transformers", dtype, rel)
    assert got["hidden"].dtype == dtype
    assert rel <= TOL[dtype], rel


def test_batch_runs_item_by_item():
    """Two sequences in one batch (no padding): each runs as its own pair calls, and matches sdpa."""
    model, _ = build("qwen3")
    ids = tokens(batch=2)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    for b in range(2):
        assert row_errors(got[b], want[b])[1] <= TOL[torch.float32]
    assert hf.counts()["attention_calls_per_layer"][0] == 2 * BLOCKS * (BLOCKS + 1) // 2


# -- counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "bert"])
def test_counts_equal_the_task_graph(family, tmp_path):
    """The pair calls per layer are the logical graph's (emulate.compile on the same checkpoint)."""
    model, path = checkpoint(family, tmp_path)
    n, m = 257, 32
    hf.register(block_size=m)
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        model(input_ids=tokens(n))
    c = hf.counts()
    graph = emulate.compile(str(path), tokens=n, block_size=m)
    want = counts(graph)
    blocks = graph.graph["blocks"]
    assert blocks == 9
    assert [c["attention_calls_per_layer"][layer] for layer in range(2)] == want["attention_calls_per_layer"]
    assert c["attention_calls"] == want["attention_calls"]
    assert c["max_call_tokens"] == m
    if family == "llama":  # causal: B(B+1)/2 per layer, the bound itself
        assert want["attention_calls_per_layer"] == [Pattern("causal").calls_bound(blocks, m)] * 2 == [45, 45]
    if family == "bert":
        assert want["attention_calls_per_layer"] == [blocks * blocks] * 2


def test_reset_and_register_again():
    model, _ = build("olmo2")
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        model(input_ids=tokens(), use_cache=False)
        model(input_ids=tokens(), use_cache=False)
    c = hf.counts()
    assert c["invocations"] == {0: 2, 1: 2} and c["attention_calls"] == 2 * 2 * 15
    hf.reset()
    assert hf.counts()["attention_calls"] == 0 and hf.counts()["max_call_tokens"] == 0
    hf.register(block_size=100)  # a new M: 3 blocks, 6 causal pairs per layer
    with torch.no_grad():
        model(input_ids=tokens(), use_cache=False)
    assert hf.counts()["attention_calls_per_layer"] == {0: 6, 1: 6} and hf.counts()["max_call_tokens"] == 100
    with pytest.raises(EmulateError, match="block_size"):
        hf.register(block_size=0)


def test_paper_oracle_runs_the_pairs():
    """oracle=PaperOracle(stable=True): the paper's constructions answer the same pair calls."""
    hf.register(block_size=M, oracle=emulate.PaperOracle(stable=True))
    model, _ = build("qwen3")
    ids = tokens(130)
    want = forward(model, ids, "sdpa")
    got = forward(model, ids, "emulate")
    # paper-stable keeps the exact modes' contract (docs/numerics.md): float32's 2e-5, per row
    assert row_errors(got["hidden"], want["hidden"])[1] <= TOL[torch.float32]
    assert row_errors(got["logits"], want["logits"])[1] <= TOL[torch.float32]


# -- refusals: one EmulateError line each --------------------------------------------------------


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_refuses_padding():
    model, _ = build("llama")
    model.set_attn_implementation("emulate")
    mask = torch.ones(1, 100, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    with pytest.raises(EmulateError) as e, torch.no_grad():
        model(input_ids=tokens(100), attention_mask=mask, use_cache=False)
    assert "not its plain causal mask" in one_line(e)


def test_all_ones_attention_mask_is_accepted():
    model, _ = build("mistral")
    want = forward(model, tokens(), "sdpa")
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        got = model(input_ids=tokens(), attention_mask=torch.ones(1, N, dtype=torch.long), use_cache=False).logits[0]
    assert row_errors(got, want["logits"])[1] <= TOL[torch.float32]


def test_refuses_softcap(sdpa_for_gemma2):
    model, _ = build("gemma2", attn_logit_softcapping=50.0)
    model.set_attn_implementation("emulate")
    with pytest.raises(EmulateError) as e, torch.no_grad():
        model(input_ids=tokens(80), use_cache=False)
    assert "soft-caps" in one_line(e)


def test_refuses_dropout_in_training():
    model, _ = build("qwen3", attention_dropout=0.1)
    model.set_attn_implementation("emulate")
    model.train()
    with pytest.raises(EmulateError) as e:
        model(input_ids=tokens(80), use_cache=False)
    assert "dropout" in one_line(e) and "model.eval()" in str(e.value)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_generate_with_the_cache_is_sdpa_token_for_token(family):
    """model.generate() on transformers' own dynamic cache: each decode step's query attends the cached
    key blocks in calls of at most M keys; greedy tokens identical to sdpa's in float64, every step's
    logits as close as float32 (generate returns them cast) allows."""
    model, _ = build(family)
    model = model.to(torch.float64)
    ids = tokens(70)

    def generate(implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)

    want = generate("sdpa")
    hf.reset()
    got = generate("emulate")
    assert got.sequences.tolist() == want.sequences.tolist()
    assert torch.equal(torch.cat(got.logits), torch.cat(want.logits)) or \
        float((torch.cat(got.logits) - torch.cat(want.logits)).abs().max()) <= 1e-5
    c = hf.counts()
    assert c["max_call_tokens"] <= M and c["invocations"][0] == 60  # the prefill and 59 cached steps
    # layer 0 of llama is causal: the step at position t reads ceil((t + 1) / M) key blocks
    if family == "llama":
        prefill = BLOCKS_OF(70) * (BLOCKS_OF(70) + 1) // 2
        assert c["attention_calls_per_layer"][0] == prefill + sum(BLOCKS_OF(t + 1) for t in range(70, 129))


def BLOCKS_OF(n: int) -> int:
    return -(-n // M)


def test_refuses_bidirectional_windows():
    """ModernBERT's local layers slide both ways: not a pattern of ours, refused."""
    config = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, local_attention=32,
                                           global_attn_every_n_layers=2, pad_token_id=0)
    model = seeded(transformers.ModernBertModel._from_config(config, attn_implementation="sdpa"))
    model.set_attn_implementation("emulate")
    with pytest.raises(EmulateError) as e, torch.no_grad():
        model(input_ids=tokens(100))
    assert "not its plain full mask" in one_line(e)


class Layer(torch.nn.Module):
    is_causal = True
    layer_idx = 0


@pytest.mark.parametrize("kwargs,words", [
    ({"s_aux": torch.zeros(4)}, "attention sinks"),
    ({"position_bias": torch.zeros(1, 4, 8, 8)}, "position bias"),
    ({"softcap": 30.0}, "soft-caps"),
], ids=["sinks", "position-bias", "softcap"])
def test_refuses_what_it_cannot_honour(kwargs, words):
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(EmulateError) as e:
        hf.attention(Layer(), q, k, k, None, **kwargs)
    assert words in one_line(e)


def test_refuses_an_additive_bias():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    bias = torch.full((8, 8), torch.finfo(torch.float32).min).triu(1)
    hf.attention(Layer(), q, k, k, bias[None, None])  # a plain additive causal mask is fine
    with pytest.raises(EmulateError) as e:
        hf.attention(Layer(), q, k, k, (bias + 0.5 * torch.ones(8, 8).tril())[None, None])  # ALiBi-like
    assert "additive attention bias" in one_line(e)


# -- the attention function alone, against sdpa in float64 ------------------------------------


@pytest.mark.parametrize("pattern", [Pattern("causal"), Pattern("sliding", window=40), Pattern("sliding", window=64),
                                     Pattern("sliding", window=1), Pattern("full")], ids=lambda p: p.describe())
def test_attention_matches_sdpa_float64(pattern):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, N, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    layer = Layer()
    layer.is_causal = pattern.causal
    kwargs = {"sliding_window": pattern.window} if pattern.window else {}
    got, weights = hf.attention(layer, q, k, v, None, scaling=0.3, **kwargs)
    visible = torch.from_numpy(pattern.visible(torch.arange(N).numpy(), torch.arange(N).numpy()))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.3, enable_gqa=True)
    assert weights is None and got.shape == (1, N, 4, 16)
    assert (got - want.transpose(1, 2)).abs().max() <= 1e-13
    blocks = BLOCKS
    calls = hf.counts()["attention_calls"]
    if pattern.kind == "causal":
        assert calls == blocks * (blocks + 1) // 2
    elif pattern.kind == "full":
        assert calls == blocks * blocks
    else:
        assert calls <= pattern.calls_bound(blocks, M)


def test_sliding_window_is_not_off_by_one():
    """transformers' sliding_window W shows query i keys i-W+1 .. i (masking_utils.sliding_window_overlay): r = W.

    The mask transformers builds for mistral's W = 40 is checked against our Pattern on every call;
    read as r = 39 or r = 41 it would not be the same mask, and the call is refused.
    """
    model, _ = build("mistral")
    model.set_attn_implementation("emulate")
    with torch.no_grad():
        model(input_ids=tokens(120), use_cache=False)  # r = 40: accepted
    n = 120
    mask = torch.from_numpy(Pattern("sliding", window=40).visible(torch.arange(n).numpy(), torch.arange(n).numpy()))
    q, k = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16)
    hf.attention(Layer(), q, k, k, mask[None, None], sliding_window=40)
    for r in (39, 41):
        with pytest.raises(EmulateError, match="not its plain sliding"):
            hf.attention(Layer(), q, k, k, mask[None, None], sliding_window=r)
