"""The paper oracle: each construction call for call, the capacity guard, the counts, exactness.

Units (layouts, the small transformer, one pair call) use PaperAttention, PairCall and plan_pair
directly; every whole forward goes through the public API, emulate.run with emulate.PaperOracle.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import record_error, row_errors

import emulate
from emulate.runtime.oracles import RAW_PAPER_TOLERANCE
from emulate.cli import main as emulate_cli
from emulate.problem import resolve_patterns
from emulate.runtime.contract import PairCall
from emulate.paper import CapacityError, PaperAttention, SmallTransformer
from emulate.paper.layouts import plan_pair, window_pair
from emulate.paper.sampling import bounded_inputs, exact_attention, row_rel_err, sampled_estimate
from emulate.paper.small import Weights
from graphs import MaskKind, Pattern, block_spans, key_blocks, pair_mask

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of calls of a few dozen rows: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair_call(pattern: Pattern, q_span, k_span, layer: int = 0) -> PairCall:
    """The attend node the graph emits for (q_span, k_span) under `pattern`."""
    return PairCall(layer, tuple(q_span), tuple(k_span), MaskKind(pair_mask(pattern, q_span, k_span).kind), pattern)


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
            layouts, visible_rows = plan_pair(pair_call(pattern, q_span, k_span), k_span[1] - k_span[0])
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
    """docs/paper.md's A^(2): row 0 = (z | q_{M-1}), row m = (k_{M-m} | q_{M-1-m}), row M = (k_0 | none)."""
    M = 6
    layouts, _ = window_pair(Pattern("causal"), (M, 2 * M), (0, M))
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
    oracle = PaperAttention(block_size=7)
    pair = PairCall(0, (0, 7), (7, 14), MaskKind.NONE, Pattern("full"))
    o, lse = oracle.attend(pair, q, k, v, 0.5)
    s = 0.5 * q[0] @ k[0].T
    torch.testing.assert_close(lse[0], torch.logsumexp(s, -1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(o[0], torch.softmax(s, -1) @ v[0], rtol=1e-13, atol=1e-13)
    assert oracle.module.invocations == 2  # the A call and the B call
    assert oracle.summary()["oracle_invocations_by_construction"] == {"lemma3.1": 2}


def test_user_description_binds_a_fresh_paper_attention():
    """emulate.PaperOracle is a frozen description; each bind is a new PaperAttention with its own counts."""
    desc = emulate.PaperOracle(stable=True, pack_heads="all")
    one, two = desc.bind(16, 8), desc.bind(16, 8)
    assert isinstance(one, PaperAttention) and one is not two and one.module is not two.module
    assert one.name == desc.name == "paper-stable" and one.calls.pack_heads == 8 and one.module.capacity == 17
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.stable = False  # type: ignore[misc]
    with pytest.raises(emulate.EmulateError, match="pack_heads"):
        emulate.PaperOracle(pack_heads=9).bind(16, 8)


# -- each construction against the kernel oracle, pair by pair ---------------------------------
PAIR_CASES = [Pattern("full"), *WINDOWED]


def softmax_attention(q, k, v, scale: float, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain masked softmax attention in float64, written here apart from emulate's kernels: the
    scores matrix, -inf where a key is hidden, softmax and logsumexp per row. GQA: each KV head serves
    H / Hkv consecutive query heads. A row that sees no key gives output 0 and lse -inf."""
    group = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    scores = (scale * q.double() @ k.transpose(-1, -2)).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)
    seen = visible.any(1)
    weights = torch.where(seen[:, None], torch.exp(scores - lse[..., None].where(seen[:, None], 0.0)), 0.0)
    return weights @ v, lse


@pytest.mark.parametrize("stable", [False, True], ids=["paper", "stable"])
@pytest.mark.parametrize("pattern", PAIR_CASES, ids=lambda p: p.describe())
def test_pairs_match_plain_softmax_attention(pattern, stable):
    """Ragged blocks (N = 61, M = 16), GQA (8 query heads over 2 KV heads), every pair of the pattern."""
    tokens, block, H, Hkv, d = 61, 16, 8, 2, 8
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(H, tokens, d, generator=gen, dtype=F64)
    k = torch.randn(Hkv, tokens, d, generator=gen, dtype=F64)
    v = torch.randn(Hkv, tokens, d, generator=gen, dtype=F64)
    oracle = PaperAttention(block, stable=stable)
    kernel = emulate.KernelOracle()
    spans = block_spans(tokens, block)
    for i, (q0, q1) in enumerate(spans):
        for j in key_blocks(pattern, spans, i):
            (k0, k1) = spans[j]
            pair = pair_call(pattern, (q0, q1), (k0, k1))
            visible = torch.from_numpy(pattern.visible(np.arange(q0, q1), np.arange(k0, k1)))
            qb, kb, vb = (t.contiguous() for t in (q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]))  # as project nodes give them
            want_o, want_lse = softmax_attention(qb, kb, vb, 0.3, visible)
            got_o, got_lse = oracle.attend(pair, qb, kb, vb, 0.3)
            torch.testing.assert_close(got_lse, want_lse, rtol=1e-11, atol=1e-11)
            torch.testing.assert_close(got_o, want_o, rtol=1e-10, atol=1e-11)
            # the kernel oracle, handed the same PairCall, against the same plain softmax (an explicit
            # mask runs in tiles cut to the keys their rows see: the same sums, added in another order)
            kern_o, kern_lse = kernel.attend(pair, qb, kb, vb, 0.3)
            torch.testing.assert_close(kern_lse, want_lse, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(kern_o, want_o, rtol=1e-13, atol=1e-13)
    assert oracle.module.max_rows <= block + 1


# -- whole forwards through emulate.run: exact against the reference and the kernel oracle --------
def forward(config, weights, tokens, block, attention, window=None, sinks=None, oracle="kernel", **options):
    """One float64 forward of (config, weights) through the public API."""
    return emulate.run(emulate.Model(config, weights), tokens, block_size=block, attention=attention, window=window,
                       sinks=sinks, dtype="float64", oracle=oracle, **options)


def one_layer(config, weights):
    """The preset cut to its first layer: the same pairs per layer, a quarter of the calls."""
    return dataclasses.replace(config, layers=1, windows=config.windows[:1]), weights


def ids_for(config, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, config.vocab, (tokens,), generator=torch.Generator().manual_seed(seed))


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
    ids = ids_for(config, tokens, 3)
    paper = forward(config, weights, ids, block, attention, window, sinks, emulate.PaperOracle(), verify=True,
                    tolerance=1e-9)
    kernel = forward(config, weights, ids, block, attention, window, sinks)
    s = paper.stats
    rel_ref, rel_kernel = s["max_rel_err"], row_errors(paper.hidden, kernel.hidden)[1]
    patterns = resolve_patterns(config, attention, window, sinks)
    record_error(f"{name}, paper oracle", patterns, "reference", F64, rel_ref)
    record_error(f"{name}, paper oracle", patterns, "kernel oracle", F64, rel_kernel)
    assert rel_ref <= 1e-9 and s["verified"] is True and s["tolerance"] == 1e-9
    assert rel_kernel <= 1e-9
    if config.lm_head:  # the decoders' next-token log-probabilities agree too
        assert s["max_logprob_err"] <= 1e-9
        assert float((paper.logprobs - kernel.logprobs).abs().max()) <= 1e-9
    assert s["oracle"] == "paper" and s["oracle_capacity"] == block + 1
    assert 0 < s["oracle_max_rows"] <= block + 1
    assert s["oracle_invocations"] == sum(s["oracle_invocations_by_construction"].values())


def test_sliding_with_window_longer_than_block(presets):
    """r > M: whole earlier blocks inside the window take Thm 3.5's A^(1) + A^(2)."""
    config, weights = one_layer(*presets["tiny-llama"])
    ids = ids_for(config, 130, 4)
    run = forward(config, weights, ids, 16, "sink", 50, 3, emulate.PaperOracle(stable=True), verify=True,
                  tolerance=1e-9)
    assert run.stats["max_rel_err"] <= 1e-9 and run.stats["verified"] is True
    assert {"thm3.5-lower", "thm3.5-upper", "thm5.1-suffix", "sec5-sinks"} <= set(
        run.stats["oracle_invocations_by_construction"])


def test_stable_variant_holds_where_the_readout_breaks(presets):
    """Scores x 6 (log A ~ 35): p/(1-p) has lost its digits in float64; the stabilised calls have not."""
    config, weights = one_layer(*presets["tiny-bert"])
    weights = dict(weights)
    weights["layers.0.q.weight"] = weights["layers.0.q.weight"] * 6
    weights["layers.0.q.bias"] = weights["layers.0.q.bias"] * 6
    ids = ids_for(config, 128, 5)
    paper = forward(config, weights, ids, 32, "full", oracle="paper", verify=True).stats
    stable = forward(config, weights, ids, 32, "full", oracle="paper-stable", verify=True, tolerance=1e-9).stats
    err_paper, err_stable = paper["max_rel_err"], stable["max_rel_err"]
    assert not err_paper <= 1e-6  # NaN counts as broken too
    assert err_stable <= 1e-9
    # verify says so: the raw run fails its own stated tolerance (NaN never passes), the stable one passes
    assert paper["tolerance"] == RAW_PAPER_TOLERANCE[F64] and paper["verified"] is False
    assert stable["verified"] is True
    assert paper["oracle_invocations"] == stable["oracle_invocations"]


def test_raw_paper_run_above_its_tolerance_is_not_verified(presets):
    """verify's verdict is the error against the tolerance: the same exact run passes 1e-8 and fails 1e-30."""
    config, weights = one_layer(*presets["tiny-llama"])
    ids = ids_for(config, 40, 11)
    strict = forward(config, weights, ids, 16, "causal", oracle="paper", verify=True, tolerance=1e-30).stats
    assert strict["tolerance"] == 1e-30 and strict["verified"] is False
    assert not strict["max_rel_err"] <= 1e-30  # above the tolerance (or NaN): either way not verified
    stated = forward(config, weights, ids, 16, "causal", oracle="paper", verify=True).stats
    assert stated["tolerance"] == RAW_PAPER_TOLERANCE[F64] and stated["verified"] is True
    assert stated["max_rel_err"] == strict["max_rel_err"]  # the same run, judged twice


# -- counts ------------------------------------------------------------------------------------
def invocations(config, weights, tokens, block, attention, window=None, sinks=None, pack=1):
    ids = ids_for(config, tokens, 6)
    run = forward(config, weights, ids, block, attention, window, sinks, emulate.PaperOracle(pack_heads=pack),
                  collect=False)
    return run.stats["oracle_invocations"]


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
    ids = ids_for(config, 70, 7)
    outs, counts = [], []
    for pack in (1, 3, 8):
        run = forward(config, weights, ids, 16, "sink", 12, 2, emulate.PaperOracle(pack_heads=pack))
        outs.append(run.hidden)
        counts.append((run.stats["oracle_invocations"], run.stats["oracle_instances"]))
        assert run.stats["oracle_pack_heads"] == pack
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
    ids = ids_for(config, 100, 8)
    description = emulate.PaperOracle()
    paper = forward(config, weights, ids, 32, "sampled", oracle=description)
    kernel = forward(config, weights, ids, 32, "sampled")
    assert paper.stats["oracle_invocations"] == 4 * config.heads  # B = 4 blocks, B/A only
    assert paper.stats["oracle_invocations_by_construction"] == {"thm4.1": 4 * config.heads}
    assert row_errors(paper.hidden, kernel.hidden)[1] <= 1e-9  # the same estimator as the kernel oracle's
    # the description holds no counts: a second run with it counts its own calls, not the sum
    again = forward(config, weights, ids, 32, "sampled", oracle=description, collect=False)
    assert again.stats["oracle_invocations"] == 4 * config.heads


# -- CLI ---------------------------------------------------------------------------------------
def run_json(capsys, *argv) -> dict:
    assert emulate_cli(["run", *argv, "--json"]) == 0
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


def test_cli_paper_oracle_verify_failure_exits_1(capsys):
    """A raw paper-oracle run above its --tolerance: exit 1, the summary still printed, one line on stderr."""
    code = emulate_cli(["run", "--oracle", "paper", "--model", "tiny-llama", "--random-tokens", "40", "-M", "16",
                        "--dtype", "float64", "--verify", "--tolerance", "1e-30", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("emulate: verify failed"), err
    s = json.loads(out)
    assert s["oracle"] == "paper" and s["verified"] is False and s["tolerance"] == 1e-30
    assert s["max_rel_err"] is None or s["max_rel_err"] > 1e-30  # null is a NaN error, which fails too


def test_cli_oracle_errors(capsys):
    assert emulate_cli(["run", "--random-tokens", "40", "--pack-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--pack-heads" in err and "oracle paper" in err, err
    assert emulate_cli(["run", "--random-tokens", "40", "--oracle", "paper", "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "local executor" in err, err


def test_cli_theorems_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "theorems.png"
    assert emulate_cli(["theorems", "--max-tokens", "64", "--block-size", "16", "--results", "full,sliding",
                        "--plot", str(plot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    full = [r for r in out["rows"] if r["result"] == "full"]
    assert [r["invocations"] for r in full] == [r["paper_count"] for r in full]
    assert all(r["max_rel_err"] <= 1e-9 for r in out["rows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))


def test_theorems_measure_is_one_verified_api_run():
    """emulate.paper.theorems.measure: the counted calls of a packed, stabilised causal run are the paper's."""
    from emulate.paper.theorems import measure

    row = measure("causal", 64, 16, None, None, stable=True, pack_heads="all", seed=2)
    heads = emulate.load("tiny-llama").config.heads
    assert row["pack_heads"] == heads and row["capacity"] == 17 and row["max_rows"] <= 17
    assert row["invocations"] == row["paper_count"] == sum(row["by_construction"].values()) > 0
    assert row["max_rel_err"] <= 1e-9


@pytest.mark.slow
def test_theorems_default_scaling(capsys):
    """The default `emulate theorems`: full and causal slope 2, the rest slope 1, all exact but sampled."""
    assert emulate_cli(["theorems", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for result, slope in (("full", 2), ("causal", 2), ("sampled", 1), ("sliding", 1), ("sink", 1)):
        assert out["slopes"][result] == pytest.approx(slope, abs=0.1)
    assert all(r["max_rel_err"] <= 1e-9 for r in out["rows"] if r["result"] != "sampled")
