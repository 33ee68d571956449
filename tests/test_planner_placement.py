"""The planner's placements (emulate/planner/placements.py): the layers and grid placements' bytes
between workers and weights per worker, worked out by hand from the published shapes
(emulate/models/shapes.py) and set against the planner's simulation; `emulate plan --placement` in a
child process."""
from __future__ import annotations

import json

import pytest
from test_hardening import emulate_child, one_error_line

from emulate.errors import EmulateError
from emulate.models.shapes import SHAPES
from emulate.planner import predict, predict_placements
from graphs import CompactGraph, ForwardSpec, NodeKind, Pattern, node_id
from graphs.plan import Part, ValueKey, make_plan

BF16 = 2
VOCAB = 128256  # every Llama-3 shape's


def layer_parameters(s: dict) -> int:
    """One Llama layer: q, k, v, o, the SwiGLU feed-forward and two RMSNorms."""
    d, qkv = s["width"], (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    return d * qkv + s["heads"] * s["head_dim"] * d + 3 * d * s["mlp_width"] + 2 * d


def test_layers_moves_one_blocks_state_per_boundary_and_less_than_sequence():
    """Llama-3 8B, causal, 2 workers. Under layers every block crosses the one boundary once: its
    residual (width), and, as the projection of the next layer rides with the last mix of a range,
    its queries (heads x head_dim) and keys and values (2 x kv_heads x head_dim), in bf16. Under
    sequence the worker running the last block's row of a layer reads every block's keys and values
    of that layer, so it fetches at least those it did not make, in each of the 32 layers."""
    s, n, m, p = SHAPES["llama3-8b"], 16384, 2048, 2
    per_token = s["width"] + s["heads"] * s["head_dim"] + 2 * s["kv_heads"] * s["head_dim"]
    by_hand_layers = (p - 1) * n * per_token * BF16
    assert by_hand_layers == 16384 * 10240 * 2

    kv_token = 2 * s["kv_heads"] * s["head_dim"] * BF16
    spec = ForwardSpec(tokens=n, block_size=m, patterns=(Pattern("causal"),) * s["layers"], heads=s["heads"],
                       kv_heads=s["kv_heads"], head_dim=s["head_dim"], width=s["width"], mlp_width=s["mlp_width"])
    plan = make_plan(CompactGraph.build(spec), p, runnable=False)  # where sequence puts each task
    blocks = n // m
    made_on = {key: t.worker for t in plan.tasks for key in t.writes}
    at_least = 0
    for layer in range(s["layers"]):
        reader = next(t.worker for t in plan.tasks if (t.layer, t.block) == (layer, blocks - 1))
        kv = [ValueKey(node_id(NodeKind.PROJECT, layer, b), Part.KV) for b in range(blocks)]
        at_least += sum(made_on[key] != reader for key in kv) * m * kv_token
    assert at_least > 3 * by_hand_layers  # the shape's arithmetic alone: layers must move less

    common = {"block_size": m, "attention": "causal", "workers": p, "device": "h100"}
    seq, lay, _ = (o.prediction for o in predict_placements("llama3-8b", n, **common))
    assert lay.bytes_moved == by_hand_layers
    assert seq.bytes_moved >= at_least
    assert lay.inputs["placement"] == "layers" and seq.inputs["placement"] == "sequence"
    assert predict("llama3-8b", n, placement="layers", **common).bytes_moved == by_hand_layers


def test_grid_moves_each_blocks_state_across_the_row_boundary_and_its_keys_within_a_row():
    """Llama-3 8B, causal, N = 16384 in 8 blocks, grid 2x2: rows own layers 0-15 and 16-31, and under
    a causal mask a row deals its blocks out to its two columns in turn (block i on column i mod 2,
    cluster/placement.py `place_on_grid`). By hand: every block crosses the row boundary once, to its
    own column (its residual, and its queries, keys and values of layer 16: width + (heads + 2
    kv_heads) x head_dim per token, as under layers); and in each of the 32 layers the keys and
    values of every block but the last go once to the other column of the row running that layer (a
    later block there reads them; layer 16's from the first row). bf16."""
    s, n, m = SHAPES["llama3-8b"], 16384, 2048
    blocks = n // m
    xq_token = (s["width"] + s["heads"] * s["head_dim"]) * BF16
    kv_token = 2 * s["kv_heads"] * s["head_dim"] * BF16
    by_hand = n * (xq_token + kv_token) + s["layers"] * (blocks - 1) * m * kv_token

    # the same, block by block and layer by layer: a value goes once to each other worker that reads it
    def worker(layer: int, block: int) -> int:
        return 2 * (max(layer, 0) >= 16) + block % 2

    counted = 0
    for layer in range(s["layers"]):
        for i in range(blocks):
            made = worker(layer - 1, i)
            counted += (worker(layer, i) != made) * m * xq_token
            counted += len({worker(layer, j) for j in range(i, blocks)} - {made}) * m * kv_token
    assert counted == by_hand
    common = {"block_size": m, "attention": "causal", "workers": 4, "device": "h100"}
    outcomes = {o.placement: o.prediction for o in predict_placements("llama3-8b", n, grid="2x2", **common)}
    grid, lay = outcomes["grid"], outcomes["layers"]
    assert grid.bytes_moved == by_hand and grid.inputs["grid"] == "2x2"
    assert predict("llama3-8b", n, placement="grid", **common).bytes_moved == by_hand  # 2x2: the default for 4
    # the two workers of a row hold the same weights, about half the model's
    w = grid.worker_weights_gb
    assert w[0] == w[1] and w[2] == w[3] and all(abs(x / (sum(lay.worker_weights_gb) / 2) - 1) < 0.1 for x in w)
    assert grid.peak_worker_memory_gb < outcomes["sequence"].peak_worker_memory_gb


def test_layers_holds_about_a_pth_of_the_weights_and_fits_where_sequence_does_not():
    """Llama-3 70B on 4 workers of one H100: 20 layers each, the embedding on the first, the final
    norm and head on the last, the next layer's pre-norm and q, k, v where a range ends. Each is
    within 5% of a quarter of the model's 70.6 B parameters; the whole model (141 GB) does not fit
    80 GB, a quarter does, with the keys and values of its 20 layers for every token."""
    s, p, n = SHAPES["llama3-70b"], 4, 8192
    d, qkv = s["width"], (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    layer = layer_parameters(s)
    total = VOCAB * d + s["layers"] * layer + d + VOCAB * d
    assert 70.5e9 < total < 70.6e9
    each = s["layers"] // p
    by_hand = [each * layer + VOCAB * d + d + d * qkv, each * layer + d + d * qkv,
               each * layer + d + d * qkv, each * layer + d + VOCAB * d]
    assert sum(by_hand) == total + (p - 1) * (d + d * qkv)

    outcomes = {o.placement: o for o in predict_placements("llama3-70b", n, block_size=4096, attention="causal",
                                                           workers=p, device="h100")}
    lay, seq = outcomes["layers"].prediction, outcomes["sequence"].prediction
    assert lay.worker_weights_gb == pytest.approx([w * BF16 / 1e9 for w in by_hand], rel=1e-12)
    assert all(abs(w / (total / p) - 1) < 0.05 for w in by_hand)
    kv_of_its_layers = each * n * 2 * s["kv_heads"] * s["head_dim"] * BF16
    for peak, weights in zip(lay.worker_memory_gb, lay.worker_weights_gb):
        assert peak * 1e9 >= weights * 1e9 + kv_of_its_layers
    assert lay.fits and outcomes["layers"].refusal is None and lay.peak_worker_memory_gb < 80
    assert not seq.fits and "does not fit 1 x h100" in outcomes["sequence"].refusal
    assert seq.weights_gb_per_worker == pytest.approx(total * BF16 / 1e9)
    with pytest.raises(EmulateError, match="--gpus-per-worker 2 would"):
        predict("llama3-70b", n, block_size=4096, attention="causal", workers=p, device="h100")
    assert predict("llama3-70b", n, block_size=4096, attention="causal", workers=p, device="h100",
                   placement="layers").fits


def test_plan_placement_all_prints_both_side_by_side():
    done = emulate_child("plan", "--shape", "llama3-8b", "--tokens", "16384", "-M", "4096", "--attention", "causal",
                         "--workers", "2", "--device", "h100", "--placement", "all")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert {"sequence", "layers", "grid", "ratio"} <= rows.keys() and rows["layers"].endswith("yes")
    assert rows["grid"].startswith("grid 2x1")  # 2 workers: the default grid is the layers layout
    as_json = emulate_child("plan", "--shape", "llama3-8b", "--tokens", "16384", "-M", "4096", "--attention",
                            "causal", "--workers", "2", "--device", "h100", "--placement", "all", "--json")
    placed = {r["placement"]: r for r in json.loads(as_json.stdout)["placements"]}
    assert placed["layers"]["bytes_moved"] == 16384 * 10240 * 2 == placed["grid"]["bytes_moved"]
    assert f"{placed['layers']['predicted_s']:.4g}" in rows["layers"]
    one = emulate_child("plan", "--shape", "llama3-8b", "--tokens", "16384", "-M", "4096", "--attention", "causal",
                        "--workers", "2", "--device", "h100", "--placement", "layers")
    assert one.returncode == 0 and "16 layers on each of 2 workers" in one.stdout


@pytest.mark.parametrize("args,says", [
    (["--placement", "auto"], "invalid choice"),
    (["--placement", "grid", "--workers", "4", "--grid", "3x3"], "--grid 3x3 is 9 workers, but the run has 4"),
    (["--placement", "layers", "--workers", "2", "--grid", "2x1"], "--grid is the shape of --placement grid"),
    (["--placement", "layers", "--workers", "17"], "17 workers for 16 layers"),
    (["--placement", "layers", "--plot", "p.png"], "--plot draws the sequence placement only"),
])
def test_plan_placement_bad_input_is_one_line(args, says, tmp_path):
    done = emulate_child("plan", "--shape", "llama3.2-1b", "--tokens", "8192", "-M", "4096", "--device", "h100",
                         *args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and says in one_error_line(done.stderr)
    assert not (tmp_path / "p.png").exists()


def test_all_names_a_placement_it_cannot_lay_out():
    outcomes = predict_placements("llama3.2-1b", 8192, block_size=4096, attention="causal", workers=17,
                                  device="h100")
    assert [o.placement for o in outcomes] == ["sequence", "layers", "grid"]
    assert outcomes[0].prediction is not None and outcomes[1].prediction is None
    assert "17 workers for 16 layers" in outcomes[1].refusal
    assert outcomes[2].prediction.inputs["grid"] == "1x17"  # 17 is prime and past the layers: one row


def test_a_model_past_a_node_is_refused_naming_the_layers_placement_which_fits():
    """Llama-3 405B in bf16 on A100s (no fp8): 812 GB of weights need 11 GPUs, more than a node's 8,
    so the refusal names --placement layers; on 16 workers a range of 7 or 8 layers fits one A100."""
    common = {"block_size": 4096, "attention": "causal", "workers": 16, "device": "a100"}
    with pytest.raises(EmulateError, match="--placement layers .*the weights need 11 GPUs"):
        predict("llama3-405b", 8192, **common)
    layers = predict("llama3-405b", 8192, placement="layers", **common)
    assert layers.fits and layers.peak_worker_memory_gb < 80
