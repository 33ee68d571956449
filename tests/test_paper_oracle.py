"""The paper oracle: each construction call for call, the capacity guard, the counts, exactness."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import record_error

from emulate.cli import main as emulate
from emulate.executor import run_local
from emulate.forward import Collected, compile_forward, new_model, resolve_patterns, row_errors
from emulate.kernels import attend
from emulate.ops import NodeRunner
from emulate.paper import CapacityError, PaperOracle, SmallTransformer
from emulate.paper.layouts import plan_pair, window_pair
from emulate.paper.sampling import bounded_inputs, exact_attention, row_rel_err, sampled_estimate
from emulate.paper.small import Weights
from emulate.reference import reference_forward
from graphs import Pattern, block_spans, key_blocks, pair_mask

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of calls of a few dozen rows: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- layouts: every visible key exactly once, nothing else, no call over capacity ---------------
WINDOWED = [Pattern("causal"), Pattern("sliding", window=1), Pattern("sliding", window=5),
            Pattern("sliding", window=16), Pattern("sliding", window=40), Pattern("sink", window=3, sinks=2),
            Pattern("sink", window=7, sinks=20), Pattern("sink", window=30, sinks=5)]


@pytest.mark.parametrize("pattern", WINDOWED, ids=lambda p: p.describe())
@pytest.mark.parametrize("tokens,block", [(61, 16), (16, 16), (9, 16), (50, 7)])
def test_layouts_cover_each_visible_key_once(pattern, tokens, block):
    """Signed sum over a pair's layouts of "query u sees key j" equals the pattern's mask, entry by entry."""
    spans = block_spans(tokens, block)
    for i, q_span in enumerate(spans):
        for j in key_blocks(pattern, spans, i):
            k_span = spans[j]
            kind = pattern.kind
            layouts, visible_rows = plan_pair(kind, pattern.window, pattern.sinks, q_span, k_span, k_span[1] - k_span[0])
            cover = np.zeros((q_span[1] - q_span[0], k_span[1] - k_span[0]), dtype=int)
            for lay in layouts:
                for u, row in enumerate(lay.queries):
                    cover[row, lay.seen_keys(u)] += lay.sign
                for rows in (lay.a_rows(), lay.b_rows()):
                    assert rows.n <= block + 1  # capacity M + 1 (the synthetic token rides on top)
                    placed = rows.query_row[rows.query_row >= 0]
                    assert len(set(placed.tolist())) == len(placed)  # one query per row
                if lay.kind == "prefix":
                    assert len(set(lay.counts.tolist())) == len(lay.counts)
            want = pattern.visible(np.arange(*q_span), np.arange(*k_span)).astype(int)
            assert (cover == want).all(), (pattern, q_span, k_span)
            assert (visible_rows == want.any(1)).all()


def test_a2_layout_is_the_papers_reversed_rows():
    """PAPER.md's A^(2): row 0 = (z | q_{M-1}), row m = (k_{M-m} | q_{M-1-m}), row M = (k_0 | none)."""
    M = 6
    layouts, _ = window_pair((M, 2 * M), (0, M))
    upper = next(lay for lay in layouts if lay.construction == "thm3.5-upper")
    rows = upper.a_rows()
    assert rows.key_src[0] == -2  # z
    assert list(rows.key_src[1:]) == [M - m for m in range(1, M + 1)]
    query_at_row = {int(r): int(upper.queries[u]) for u, r in enumerate(rows.query_row)}
    assert query_at_row == {m: M - 1 - m for m in range(M)}


# -- the small transformer itself --------------------------------------------------------------
def test_capacity_guard_raises_and_counts():
    module = SmallTransformer(capacity=5)
    eye = torch.eye(3, dtype=F64)[None]
    w = Weights(eye, eye, eye)
    module(torch.randn(5, 3, dtype=F64), w, causal=False, construction="x")
    with pytest.raises(CapacityError):
        module(torch.randn(6, 3, dtype=F64), w, causal=False, construction="x")
    assert module.invocations == 1 and module.by_construction["x"] == 1 and module.max_rows == 5


def test_lemma31_a_call_returns_the_block_weight():
    """One A call with the synthetic token returns A = sum_j exp(<q_i, k_j>) for every query row."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 4, generator=gen, dtype=F64) for _ in range(3))
    oracle = PaperOracle(block_size=7)
    node = {"mask": "none", "span": (0, 7), "key_span": (7, 14)}
    o, lse = oracle.pair(q, k, v, 0.5, node, Pattern("full"))
    s = 0.5 * q[0] @ k[0].T
    torch.testing.assert_close(lse[0], torch.logsumexp(s, -1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(o[0], torch.softmax(s, -1) @ v[0], rtol=1e-13, atol=1e-13)
    assert oracle.module.invocations == 2  # the A call and the B call


# -- each construction against the kernel oracle, pair by pair ---------------------------------
PAIR_CASES = [Pattern("full"), *WINDOWED]


@pytest.mark.parametrize("stable", [False, True], ids=["paper", "stable"])
@pytest.mark.parametrize("pattern", PAIR_CASES, ids=lambda p: p.describe())
def test_pairs_match_the_kernel_oracle(pattern, stable):
    """Ragged blocks (N = 61, M = 16), GQA (8 query heads over 2 KV heads), every pair of the pattern."""
    tokens, block, H, Hkv, d = 61, 16, 8, 2, 8
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(H, tokens, d, generator=gen, dtype=F64)
    k = torch.randn(Hkv, tokens, d, generator=gen, dtype=F64)
    v = torch.randn(Hkv, tokens, d, generator=gen, dtype=F64)
    oracle = PaperOracle(block, stable=stable)
    spans = block_spans(tokens, block)
    for i, (q0, q1) in enumerate(spans):
        for j in key_blocks(pattern, spans, i):
            (k0, k1) = spans[j]
            pm = pair_mask(pattern, (q0, q1), (k0, k1))
            visible = torch.from_numpy(pattern.visible(np.arange(q0, q1), np.arange(k0, k1)))
            qb, kb, vb = (t.contiguous() for t in (q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]))  # as project nodes give them
            want_o, want_lse = attend(qb, kb, vb, 0.3, pm.kind, visible)
            node = {"mask": pm.kind, "span": (q0, q1), "key_span": (k0, k1)}
            got_o, got_lse = oracle.pair(qb, kb, vb, 0.3, node, pattern)
            torch.testing.assert_close(got_lse, want_lse, rtol=1e-11, atol=1e-11)
            torch.testing.assert_close(got_o, want_o, rtol=1e-10, atol=1e-11)
    assert oracle.module.max_rows <= block + 1


# -- whole forwards: exact against the reference and the kernel oracle ---------------------------
def forward(config, weights, tokens, block, patterns, oracle=None, dtype=F64, seed=0):
    model = new_model(config, weights, dtype, "cpu")
    g = compile_forward(config, tokens.shape[0], block, patterns, dtype, seed)
    got = Collected()
    for _, value in run_local(g, NodeRunner(model, tokens, g.graph, oracle=oracle)):
        got.add(value)
    return got.result()["hidden"], model, g


def one_layer(config, weights):
    """The preset cut to its first layer: the same pairs per layer, a quarter of the calls."""
    return dataclasses.replace(config, layers=1, windows=config.windows[:1]), weights


PRESET_CASES = [  # (preset, attention, window, sinks)
    ("tiny-bert", "full", None, None),
    ("tiny-llama", "causal", None, None),
    ("tiny-mistral", "sliding", 40, None),
    ("tiny-llama", "sink", 40, 4),
]


@pytest.mark.parametrize("name,attention,window,sinks", PRESET_CASES, ids=[c[1] for c in PRESET_CASES])
@pytest.mark.parametrize("tokens,block", [(150, 64), (40, 64)], ids=["ragged", "N<M"])
def test_forward_exact_against_reference_and_kernel(presets, name, attention, window, sinks, tokens, block):
    config, weights = presets[name]
    ids = torch.randint(0, config.vocab, (tokens,), generator=torch.Generator().manual_seed(3))
    patterns = resolve_patterns(config, attention, window, sinks)
    oracle = PaperOracle(block)
    got, model, _ = forward(config, weights, ids, block, patterns, oracle)
    kernel, _, _ = forward(config, weights, ids, block, patterns)
    with torch.no_grad():
        ref = reference_forward(model, ids, patterns)
    rel_ref, rel_kernel = row_errors(got, ref["hidden"])[1], row_errors(got, kernel)[1]
    record_error(f"{name}, paper oracle", patterns, "reference", F64, rel_ref)
    record_error(f"{name}, paper oracle", patterns, "kernel oracle", F64, rel_kernel)
    assert rel_ref <= 1e-9
    assert rel_kernel <= 1e-9
    assert oracle.module.max_rows <= block + 1


def test_sliding_with_window_longer_than_block(presets):
    """r > M: whole earlier blocks inside the window take Thm 3.5's A^(1) + A^(2)."""
    config, weights = one_layer(*presets["tiny-llama"])
    ids = torch.randint(0, config.vocab, (130,), generator=torch.Generator().manual_seed(4))
    patterns = resolve_patterns(config, "sink", 50, 3)
    oracle = PaperOracle(16, stable=True)
    got, model, _ = forward(config, weights, ids, 16, patterns, oracle)
    with torch.no_grad():
        ref = reference_forward(model, ids, patterns)
    assert row_errors(got, ref["hidden"])[1] <= 1e-9
    assert {"thm3.5-lower", "thm3.5-upper", "thm5.1-suffix", "sec5-sinks"} <= set(oracle.module.by_construction)


def test_stable_variant_holds_where_the_readout_breaks(presets):
    """Scores x 6 (log A ~ 35): p/(1-p) has lost its digits in float64; the stabilised calls have not."""
    config, weights = one_layer(*presets["tiny-bert"])
    weights = dict(weights)
    weights["layers.0.q.weight"] = weights["layers.0.q.weight"] * 6
    weights["layers.0.q.bias"] = weights["layers.0.q.bias"] * 6
    ids = torch.randint(0, config.vocab, (128,), generator=torch.Generator().manual_seed(5))
    patterns = resolve_patterns(config, "full")
    paper = PaperOracle(32)
    stable = PaperOracle(32, stable=True)
    got_paper, model, _ = forward(config, weights, ids, 32, patterns, paper)
    got_stable, _, _ = forward(config, weights, ids, 32, patterns, stable)
    with torch.no_grad():
        ref = reference_forward(model, ids, patterns)["hidden"]
    err_paper, err_stable = row_errors(got_paper, ref)[1], row_errors(got_stable, ref)[1]
    assert not err_paper <= 1e-6  # NaN counts as broken too
    assert err_stable <= 1e-9
    assert paper.module.invocations == stable.module.invocations


# -- counts ------------------------------------------------------------------------------------
def invocations(config, weights, tokens, block, attention, window=None, sinks=None, pack=1):
    ids = torch.randint(0, config.vocab, (tokens,), generator=torch.Generator().manual_seed(6))
    oracle = PaperOracle(block, pack_heads=pack)
    forward(config, weights, ids, block, resolve_patterns(config, attention, window, sinks), oracle)
    return oracle.module.invocations


@pytest.mark.parametrize("name,attention,window,sinks,factor", [
    ("tiny-bert", "full", None, None, 4), ("tiny-llama", "causal", None, None, 4),
    ("tiny-llama", "sliding", 8, None, 2), ("tiny-llama", "sink", 8, 2, 2), ("tiny-bert", "sampled", None, None, 2),
], ids=["full", "causal", "sliding", "sink", "sampled"])
def test_doubling_n_scales_invocations(presets, name, attention, window, sinks, factor):
    config, weights = one_layer(*presets[name])
    small = invocations(config, weights, 128, 16, attention, window, sinks)
    large = invocations(config, weights, 256, 16, attention, window, sinks)
    assert large / small == pytest.approx(factor, rel=0.12)


def test_counts_are_the_papers_for_full_and_causal(presets):
    """Lemma 3.1: 2 calls per pair; Claim B.6 / Thm 3.5: 2 per diagonal block, 4 per earlier block."""
    for name, attention in (("tiny-bert", "full"), ("tiny-llama", "causal")):
        config, weights = one_layer(*presets[name])
        B, H = 5, config.heads
        want = 2 * B * B * H if attention == "full" else (2 * B + 4 * B * (B - 1) // 2) * H
        assert invocations(config, weights, 5 * 16 - 3, 16, attention) == want


def test_pack_heads_same_bits_fewer_calls(presets):
    """Lemma 3.3: 8 heads side by side in one call; the outputs are identical bit for bit."""
    config, weights = one_layer(*presets["tiny-llama"])
    ids = torch.randint(0, config.vocab, (70,), generator=torch.Generator().manual_seed(7))
    patterns = resolve_patterns(config, "sink", 12, 2)
    outs, counts = [], []
    for pack in (1, 3, 8):
        oracle = PaperOracle(16, pack_heads=pack)
        outs.append(forward(config, weights, ids, 16, patterns, oracle)[0])
        counts.append((oracle.module.invocations, oracle.module.instances))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    one, three, eight = counts
    assert one[1] == three[1] == eight[1] == one[0]  # the same single-head instances run
    assert one[0] == 8 * eight[0] and three[0] == math.ceil(8 / 3) * eight[0]


# -- Thm 4.1 -----------------------------------------------------------------------------------
def test_sampled_error_falls_as_m_grows():
    """On inputs meeting Thm 4.1's assumption (C = e), the 90th-percentile row error shrinks with M."""
    q, k, v = bounded_inputs(2048, math.e, seed=0)
    exact = exact_attention(q, k, v)
    p90 = []
    for M in (16, 64, 256):
        errs = [float(row_rel_err(sampled_estimate(q, k, v, M, seed), exact).max()) for seed in range(8)]
        p90.append(np.percentile(errs, 90))
    assert p90[0] > p90[1] > p90[2]
    assert p90[2] < 0.5 * p90[0]


def test_sampled_forward_is_one_call_per_block_and_head(presets):
    config, weights = one_layer(*presets["tiny-bert"])
    ids = torch.randint(0, config.vocab, (100,), generator=torch.Generator().manual_seed(8))
    patterns = resolve_patterns(config, "sampled")
    oracle = PaperOracle(32)
    got, _, _ = forward(config, weights, ids, 32, patterns, oracle)
    kernel, _, _ = forward(config, weights, ids, 32, patterns)
    assert oracle.module.invocations == 4 * config.heads  # B = 4 blocks, B/A only
    assert row_errors(got, kernel)[1] <= 1e-9  # the same estimator as the kernel oracle's


# -- CLI ---------------------------------------------------------------------------------------
def run_json(capsys, *argv) -> dict:
    assert emulate(["run", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_paper_oracle_summary(capsys):
    s = run_json(capsys, "--model", "tiny-llama", "--random-tokens", "70", "-M", "32", "--attention", "sliding",
                 "--window", "10", "--dtype", "float64", "--oracle", "paper", "--verify")
    assert s["oracle"] == "paper" and s["oracle_capacity"] == 33 and s["max_rel_err"] <= 1e-9
    assert s["oracle_invocations"] == sum(s["oracle_invocations_by_construction"].values()) > 0
    packed = run_json(capsys, "--model", "tiny-llama", "--random-tokens", "70", "-M", "32", "--attention", "sliding",
                      "--window", "10", "--dtype", "float64", "--oracle", "paper", "--pack-heads")
    assert packed["oracle_invocations"] * 8 == s["oracle_invocations"] and packed["oracle_pack_heads"] == 8
    kernel = run_json(capsys, "--model", "tiny-llama", "--random-tokens", "70", "-M", "32")
    assert kernel["oracle"] == "kernel" and "oracle_invocations" not in kernel


def test_cli_oracle_errors(capsys):
    assert emulate(["run", "--random-tokens", "40", "--pack-heads", "2"]) == 2
    assert "--oracle paper" in capsys.readouterr().err
    assert emulate(["run", "--random-tokens", "40", "--oracle", "paper", "--executor", "ray"]) == 2
    assert "local executor" in capsys.readouterr().err


def test_cli_theorems_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "theorems.png"
    assert emulate(["theorems", "--max-tokens", "64", "--block-size", "16", "--results", "full,sliding",
                    "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    full = [r for r in out["rows"] if r["result"] == "full"]
    assert [r["invocations"] for r in full] == [r["paper_count"] for r in full]
    assert all(r["max_rel_err"] <= 1e-9 for r in out["rows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_theorems_default_scaling(capsys):
    """The default `emulate theorems`: full and causal slope 2, the rest slope 1, all exact but sampled."""
    assert emulate(["theorems", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for result, slope in (("full", 2), ("causal", 2), ("sampled", 1), ("sliding", 1), ("sink", 1)):
        assert out["slopes"][result] == pytest.approx(slope, abs=0.1)
    assert all(r["max_rel_err"] <= 1e-9 for r in out["rows"] if r["result"] != "sampled")
