"""The planner: the physical plan read off the compact graph, the cost model on graphs small enough
to work out by hand, scaling sanity, the CPU calibration's cache and `emulate plan`'s contract.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from graphs.plan import make_plan
from emulate.cli import main
from emulate.planner.calibrate import CACHE_FORMAT
from emulate.planner import (DEVICES, Device, Hardware, cpu_device, hardware, predict, predict_placements, simulate,
                             task_seconds, value_bytes)
from graphs import CompactGraph, ForwardSpec, Pattern, build_graph

FLOPS = 1e9


def spec(tokens, block_size, patterns, vocab=64):
    return ForwardSpec(tokens=tokens, block_size=block_size, patterns=tuple(patterns), heads=4, kv_heads=2,
                       head_dim=8, width=32, mlp_width=64, vocab=vocab)


def toy_hardware(workers, call=1e-6, task=1e-4, link_gbps=8.0, latency=1e-3):
    """A device with round figures: 1 GFLOP/s, memory never the bottleneck."""
    dev = Device("toy", {"fp32": FLOPS}, bandwidth=1e18, memory=1e12, efficiency=1.0, call_overhead_s=call)
    return Hardware(dev, workers, 1, link_gbps, latency, task, "fp32")


def schedule(s, hw):
    c = CompactGraph.build(s)
    plan = make_plan(c, hw.workers, runnable=False)
    return plan, simulate(plan, s, c.spans, hw)


@pytest.mark.parametrize("N,M", [(100, 16), (7, 3), (130, 7), (5, 8)])
@pytest.mark.parametrize("patterns", [[Pattern("full")] * 2, [Pattern("causal")] * 3, [Pattern("sampled")] * 2,
                                      [Pattern("sliding", window=20), Pattern("sink", window=9, sinks=3)]])
def test_the_compact_plan_is_the_executors_plan(N, M, patterns):
    s = spec(N, M, patterns)
    for workers, split in ((1, None), (2, None), (3, True), (16, None)):
        c = CompactGraph.build(s)
        a, b = make_plan(build_graph(s), workers, split), make_plan(c, workers, split, runnable=False)
        fields = lambda t: (t.kind, t.layer, t.block, t.worker, t.flops, t.bytes, t.calls, t.pairs,  # noqa: E731
                            t.attend_flops, t.attend_blocks, t.attend_counts, t.reads, t.writes,
                            [n for n in t.logical_nodes() if "attend" not in n])
        assert [fields(t) for t in a.tasks] == [fields(t) for t in b.tasks], workers
        # every attend call counted once, under its own mask
        assert all(sum(t.attend_counts) == t.pairs for t in b.tasks)
        assert sum(sum(t.attend_counts) for t in b.tasks) == c.counts()["attention_calls"]
        assert a.split_blocks == b.split_blocks
        # what the Ray executor runs: the same tasks to the last node attribute, with no networkx graph
        runnable = make_plan(c, workers, split)
        assert runnable.tasks == a.tasks and runnable.split_blocks == a.split_blocks, workers
        assert all(t.attrs and set(t.attrs) == set(t.logical_nodes()) for t in runnable.tasks)


def test_the_runnable_plan_fits_the_memory_estimate():
    """The Ray executor's driver holds the runnable plan (every node's attributes): memory.estimate
    prices it per node; 32,896 pair calls here, measured under tracemalloc."""
    import tracemalloc

    from emulate.runtime.memory import COMPACT_PAIR_BYTES, PLAN_NODE_BYTES, estimate

    s = spec(65536, 256, [Pattern("causal")])
    c = CompactGraph.build(s)
    tracemalloc.start()
    try:
        plan = make_plan(c, 2)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    nodes = c.node_count()
    assert sum(len(t.attrs) for t in plan.tasks) == nodes > 33_000
    config = SimpleNamespace(width=32, heads=4, kv_heads=2, head_dim=8)
    priced = estimate(config, 65536, 256, [Pattern("causal")], 4, run=False, graph="plan")["graph"]
    assert held < PLAN_NODE_BYTES * nodes < priced
    assert held > PLAN_NODE_BYTES * nodes / 2  # the price is not a loose bound either
    assert priced - PLAN_NODE_BYTES * nodes < COMPACT_PAIR_BYTES * 2 * nodes


def test_a_counted_plan_needs_the_compact_graph():
    with pytest.raises(ValueError, match="compact"):
        make_plan(build_graph(spec(32, 16, [Pattern("causal")])), 1, runnable=False)


def test_one_worker_takes_the_sum_of_its_task_costs():
    """1 layer, 2 blocks, 1 worker: every task back to back, in one Ray call (its cost paid once);
    nothing crosses a link."""
    s = spec(32, 16, [Pattern("causal")])
    g = build_graph(s)
    hw = toy_hardware(1)
    plan, sched = schedule(s, hw)
    assert [t.name for t in plan.tasks] == ["start 0", "start 1", "L0 row 0", "L0 row 1"]
    flops = sum(a["flops"] for _, a in g.nodes(data=True))
    by_hand = flops / FLOPS + g.number_of_nodes() * 1e-6 + 1e-4
    assert sched.makespan == pytest.approx(by_hand, rel=1e-12)
    assert sched.bytes_moved == 0 and sched.busy == [pytest.approx(by_hand)]


def test_two_workers_finish_on_the_critical_path():
    """Row 1 (two pairs) runs on worker 1 and waits for block 0's keys and values from worker 0."""
    s = spec(32, 16, [Pattern("causal")])
    hw = toy_hardware(2)
    plan, sched = schedule(s, hw)
    start0, start1, row0, row1 = plan.tasks
    assert (start0.worker, start1.worker, row0.worker, row1.worker) == (0, 1, 0, 1)
    # row 0 reads only what worker 0 made: it rides in start 0's Ray call, without a call's cost
    d = {t.name: task_seconds(t, hw, starts_call=t is not row0) for t in plan.tasks}
    kv = 2 * 16 * 2 * 8 * 4  # keys and values of block 0: 2 x m x kv_heads x head_dim x 4 bytes
    assert value_bytes(row1.reads[2], s, [(0, 16), (16, 32)]) == kv
    arrive = d["start 0"] + kv / (8e9 / 8) + 1e-3
    by_hand = max(d["start 0"] + d["L0 row 0"], max(d["start 1"], arrive) + d["L0 row 1"])
    assert sched.makespan == pytest.approx(by_hand, rel=1e-12)
    assert sched.critical_path_s == pytest.approx(by_hand, rel=1e-12)
    assert sched.bytes_moved == kv
    assert [plan.tasks[i].name for i in sched.critical_path] == ["start 0", "L0 row 1"]


def test_more_workers_are_never_slower_when_the_work_is_independent():
    """A window of one token: each row reads its own block only. With ideal links, P workers never lose."""
    s = spec(16 * 12, 16, [Pattern("sliding", window=1)] * 3)
    times = [schedule(s, toy_hardware(p, link_gbps=1e9, latency=0.0))[1].makespan for p in range(1, 13)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(times, times[1:])), times
    assert times[-1] < times[0] / 6
    causal = spec(16 * 12, 16, [Pattern("causal")] * 3)
    t1, t8 = (schedule(causal, toy_hardware(p, link_gbps=1e9, latency=0.0))[1].makespan for p in (1, 8))
    assert t8 < t1 / 3


def shared_hardware(workers, serial, flops=FLOPS, slowdown=1.0):
    """The local executor's call workers on a toy device whose calls' Python costs `serial` s each
    with `workers` workers (one GIL)."""
    dev = Device("toy", {"fp32": flops}, bandwidth=1e18, memory=1e12, efficiency=1.0, call_overhead_s=serial,
                 serial_call_s=(serial,) * workers)
    return Hardware(dev, workers, 1, 8.0, 0.0, 0.0, "fp32", slowdown, shared=True)


def test_the_call_workers_python_runs_one_task_at_a_time():
    """Calls that are all Python (FLOPs free) take as long on two call workers as on one: the GIL
    lets one worker's calls run at a time; kernels (FLOPs, no Python) run side by side."""
    s = spec(64, 8, [Pattern("causal")] * 2)
    c = CompactGraph.build(s)
    plan = make_plan(c, 1, runnable=False)
    calls = sum(t.calls for t in plan.tasks)
    python = [simulate(plan, s, c.spans, shared_hardware(k, 1e-3, flops=1e30)).makespan for k in (1, 2)]
    assert python[0] == pytest.approx(calls * 1e-3) and python[1] == pytest.approx(calls * 1e-3)
    kernels = [simulate(plan, s, c.spans, shared_hardware(k, 1e-12)).makespan for k in (1, 2)]
    assert kernels[1] < 0.75 * kernels[0]
    # the contention factor slows the kernels, never the Python measured under k workers
    slowed = simulate(plan, s, c.spans, shared_hardware(2, 1e-3, flops=1e30, slowdown=3.0)).makespan
    assert slowed == pytest.approx(calls * 1e-3)


def test_memory_holds_the_weights_and_what_is_alive():
    s = spec(64, 16, [Pattern("causal")] * 2)
    c = CompactGraph.build(s)
    plan = make_plan(c, 2)
    sched = simulate(plan, s, c.spans, toy_hardware(2), weights_bytes=1e6)
    assert all(1e6 < p < 1e6 + 64 * 4 * 1000 for p in sched.peak_memory)
    assert sum(sched.busy) / (2 * sched.makespan) <= 1.0


@pytest.mark.slow
def test_the_published_anchor_shape_is_predicted_in_seconds():
    """Llama-3 405B, 1M tokens, 16 workers of 8 H100 with fp8 feed-forward weights, as arXiv
    2411.01783 deployed it (it reports 77 s): docs/planner.md. It fits: 482 GB of weights per node."""
    p = predict("llama3-405b", 2**20, block_size=4096, attention="causal", workers=16, gpus_per_worker=8,
                device="h100", weight_dtype="fp8-ffn")  # about 30 s on a quiet core (a speed goal is not a test's)
    assert p.attention_calls == 126 * 256 * 257 // 2 and p.physical_tasks == 256 * 127
    assert 30 < p.predicted_s < 200 and p.critical_path_s < p.predicted_s and 0.5 < p.utilisation <= 1
    assert p.fits and 450 < p.peak_worker_memory_gb < 640 and 480 < p.weights_gb_per_worker < 485
    windowed = predict("llama3-405b", 2**20, block_size=4096, attention="sliding", window=4096, workers=16,
                       gpus_per_worker=8, device="h100", weight_dtype="fp8-ffn")
    assert windowed.predicted_s < p.predicted_s / 3


def test_datasheet_figures():
    assert DEVICES["a100"].flops == {"bf16": 312e12, "fp32": 19.5e12}
    assert DEVICES["h100"].flops["fp8"] == DEVICES["h200"].flops["fp8"] == 1979e12
    assert DEVICES["h100"].flops["bf16"] == DEVICES["h200"].flops["bf16"] == 989e12
    assert DEVICES["h200"].bandwidth == 4.8e12 and DEVICES["h100"].bandwidth == 3.35e12


# -- the CPU calibration ---------------------------------------------------------------------------

FAKE = {"format": CACHE_FORMAT, "matmul_flops": [[1e6, 1e9], [1e9, 2e10]],
        "attention_flops": {"none": [[1e6, 5e8], [1e9, 1e10]], "causal": [[1e6, 4e8], [1e9, 8e9]],
                            "explicit": [[1e6, 2e8], [1e9, 5e9]]},
        "call_overhead_s": 2e-5, "bandwidth": 1e10, "read_rates": [[2.5e5, 3e10], [1e8, 1.5e10]], "memory": 8e9, "contention": [1.0, 1.2],
        "worker_contention": [1.0, 1.3],
        "serial_call_s": [2e-5, 3e-5], "loaded_call_s": [2e-5, 3e-5], "kernel_probe_miss": 1.05, "merge_flops": [[8e4, 3e9], [1e7, 1e9]],
        "node_flops": [[256, 1e6, 5e9], [256, 1e9, 1.5e10], [1024, 4e6, 4e9], [1024, 4e9, 1.4e10]],
        "calibration": {"when": 1.0e9, "load": 0.1, "load_after": 0.2, "cores": 2, "torch": "x", "torch_threads": 2}}


def fake_calibration(**_):
    return {k: v for k, v in FAKE.items() if k != "format"}


def test_calibration_is_cached_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu", lambda **kw: calls.append(1) or fake_calibration())
    a = cpu_device()
    b = cpu_device()
    assert len(calls) == 1 and a == b and a.call_overhead_s == 2e-5
    assert (tmp_path / "emulate" / "cpu-calibration.json").exists()
    cpu_device(recalibrate=True)
    assert len(calls) == 2
    assert a.rate("fp32", "matmul", 1e6) == 1e9 and 1e9 < a.rate("fp32", "matmul", 3e7) < 2e10
    assert a.calibration.load == 0.1 and a.masked_attention["explicit"] == {1e6: 2e8, 1e9: 5e9}


def test_predict_recalibrates_as_the_cli_flag_and_reads_the_old_keyword_with_a_warning(tmp_path, monkeypatch):
    """`emulate plan --recalibrate` is predict(recalibrate=True); calibrate=True, the old name, still measures."""
    import warnings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu", lambda **kw: calls.append(1) or fake_calibration())
    shape = {"tokens": 1024, "block_size": 256, "attention": "causal", "executor": "local"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns of nothing
        predict("tiny-llama", **shape)
        predict("tiny-llama", recalibrate=True, **shape)
        predict_placements("tiny-llama", recalibrate=True, **shape)
    assert len(calls) == 3  # the first measure (no cache yet), then each recalibrate
    with pytest.warns(DeprecationWarning, match=r"predict\(calibrate=...\) is renamed recalibrate="):
        predict("tiny-llama", calibrate=True, **shape)
    with pytest.warns(DeprecationWarning, match="predict_placements"):
        predict_placements("tiny-llama", calibrate=True, **shape)
    with pytest.warns(DeprecationWarning, match="hardware"):
        hardware("cpu", calibrate=True)
    assert len(calls) == 6
    with pytest.raises(TypeError):
        predict("tiny-llama", recalibrate=True, recalibrat=True, **shape)


# -- emulate plan ----------------------------------------------------------------------------------

PLAN_KEYS = {"predicted_s", "attention_calls", "physical_tasks", "bytes_moved", "peak_worker_memory_gb",
             "utilisation", "critical_path_s", "model", "tokens", "block_size", "attention", "workers", "device",
             "gpus_per_worker", "link_gbps"}


def test_plan_json_has_the_figures_and_the_inputs(capsys):
    assert main(["plan", "--shape", "llama3-8b", "--tokens", "65536", "-M", "4096", "--attention", "causal",
                 "--workers", "4", "--device", "a100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert PLAN_KEYS <= d.keys()
    assert d["attention_calls"] == 32 * 16 * 17 // 2 and d["workers"] == 4 and d["device"] == "a100"


def test_plan_summary_on_a_calibrated_cpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu", fake_calibration)
    assert main(["plan", "--random-tokens", "4096", "-M", "256", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "critical path" in out and "peak" in out


@pytest.mark.parametrize("args", [
    ["--workers", "0"], ["--tokens", "0"], ["--block-size", "-1"], ["--device", "tpu"],
    ["--shape", "llama3-8b", "--model", "tiny-llama"], ["--attention", "sliding"], ["--link-gbps", "-1"],
    ["--model", "tiny-gpt9"], ["--gpus-per-worker", "0"], ["--shape", "gpt5"], ["--plot", "p.txt"],
    ["--executor", "local", "--workers", "2"], ["--threads", "0"], ["--threads", "x"], ["--weight-dtype", "fp4"],
    ["--weight-dtype", "fp8-ffn", "--device", "a100"], ["--tp-link", "infiniband"],
    ["--shape", "llama3-70b", "--tokens", "8192", "-M", "4096"],
])
def test_plan_bad_input_is_one_line_and_exit_2(capsys, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--device", "h100", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("emulate: error: ")
    assert "Traceback" not in captured.err


def test_plan_help_names_defaults_and_examples(capsys):
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    assert "example" in text and "(default: 1)" in text and "llama3-405b" in text


def test_plan_plot_is_written(capsys, tmp_path):
    out = tmp_path / "p.png"
    assert main(["plan", "--shape", "llama3.2-1b", "--tokens", "32768", "-M", "4096", "--attention", "causal",
                 "--device", "h200", "--workers", "2", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merges_are_priced_at_the_measured_merge_rate():
    """A device that measured its merge of partials (emulate/runtime/merge.py) prices every pairwise
    merge the plan runs at that rate: the time added over the GEMM-rate pricing is each merge's
    FLOPs over the merge rate, so a graph with twice the merges adds twice the time, and a graph
    without merges (every block one key block) adds nothing."""
    from dataclasses import replace

    merge_rate = FLOPS / 50  # elementwise passes over memory: far below the GEMM rate

    def added(s):
        hw = toy_hardware(1)
        priced = replace(hw, device=replace(hw.device, merge_flops={1.0: merge_rate}))
        plan, base = schedule(s, hw)
        pairs = sum(t.merge_pairs for t in plan.tasks)
        flops = sum(t.merge_flops for t in plan.tasks)
        return schedule(s, priced)[1].makespan - base.makespan, pairs, flops

    one, pairs_one, flops_one = added(spec(64, 8, [Pattern("causal")]))
    two, pairs_two, _ = added(spec(64, 8, [Pattern("causal")] * 2))
    assert pairs_one == sum(range(8)) and pairs_two == 2 * pairs_one
    assert one == pytest.approx(flops_one / merge_rate - flops_one / FLOPS)
    assert two == pytest.approx(2 * one)
    none, pairs_none, _ = added(spec(64, 8, [Pattern("sliding", window=1)]))
    assert pairs_none == 0 and none == pytest.approx(0.0)


def test_position_wise_nodes_are_priced_at_their_measured_rate():
    """A device that measured the executor's project and mix nodes (emulate/models/block.py, their
    norms, RoPE and activations beside the GEMMs) prices the non-attention, non-merge FLOPs at that
    rate: at half the GEMM rate they take twice as long, the attention calls unchanged."""
    from dataclasses import replace

    s = spec(64, 8, [Pattern("causal")] * 2)
    hw = toy_hardware(1)
    plan, base = schedule(s, hw)
    halved = replace(hw, device=replace(hw.device, node_flops={8: {1.0: FLOPS / 2}}))
    nodes = sum(t.flops - t.attend_flops for t in plan.tasks)  # merges too: this device has no merge rate
    assert schedule(s, halved)[1].makespan - base.makespan == pytest.approx(nodes / FLOPS)


def test_the_node_rate_is_read_by_the_calls_rows_as_well_as_its_flops():
    """One FLOP count is a wide block's short call or a narrow one's long call: each M's own curve by
    FLOPs, log-linear between the measured Ms, the nearest M's beyond them."""
    from emulate.planner.costs import Device

    dev = Device("cpu", {"fp32": 1e10}, 1e10, 8e9, 1.0, 0.0, "test",
                 node_flops={256: {256e4: 4e9, 256e6: 8e9}, 2048: {2048e4: 2e9, 2048e6: 6e9}})
    # one FLOP count, two Ms: the M = 256 call is the wider block's and runs faster
    assert dev.node_rate(256, 256e5) == pytest.approx(6e9)  # half way in log FLOPs per row, at M = 256
    wide, narrow = dev.node_rate(256, 2048e4), dev.node_rate(2048, 2048e4)  # FLOPs per row 8e4 and 1e4
    assert wide == pytest.approx(4e9 + 4e9 * math.log(8) / math.log(100)) and narrow == pytest.approx(2e9)
    # between the Ms, a block of the same width (FLOPs per row 1e5) at each: half way in log M
    assert dev.node_rate(724, 724e5) == pytest.approx(5e9, rel=1e-3)  # sqrt(256 x 2048) = 724
    assert dev.node_rate(64, 64e7) == pytest.approx(8e9) and dev.node_rate(8192, 8192e3) == pytest.approx(2e9)


def test_each_masks_calls_are_priced_at_their_own_size():
    """A task of one whole causal block (1e9 FLOPs) and ten small explicit calls (a sink's few keys,
    1e6 FLOPs each): the explicit calls at the rate of a 1e6-FLOP call, not of the task's mean call."""
    from graphs.compact import MASKS
    from graphs.plan import Task, TaskKind

    slow_small = {1e6: 1e8, 1e9: 1e10}  # FLOP/s by FLOPs per call
    dev = Device("toy", {"fp32": 1e30}, bandwidth=1e30, memory=1e12, efficiency=1.0, call_overhead_s=0.0,
                 attention_flops=slow_small, masked_attention={"causal": slow_small, "explicit": slow_small})
    hw = Hardware(dev, 1, 1, 8.0, 0.0, 0.0, "fp32")
    t = Task(0, TaskKind.ROW, 0, 0, [], [], [])
    blocks, counts = [0] * len(MASKS), [0] * len(MASKS)
    for mask, flops, n in (("causal", 10**9, 1), ("explicit", 10 * 10**6, 10)):
        i = [m.value for m in MASKS].index(mask)
        blocks[i], counts[i] = flops, n
    t.attend_blocks, t.attend_counts, t.pairs = blocks, counts, 11
    t.flops = t.attend_flops = sum(blocks)
    assert task_seconds(t, hw) == pytest.approx(1e9 / 1e10 + 1e7 / 1e8)


def test_a_grouped_query_models_masked_calls_pay_the_key_and_value_copy_at_the_copy_bandwidth():
    """The CPU kernels repeat a GQA model's keys and values to every query head before a masked call
    (emulate/runtime/kernels.py, attend): the causal call its square block, a window's tiles their
    boxes; priced at the device's copy bandwidth, and not for a model with a KV head per query head."""
    from dataclasses import replace

    from graphs.compact import MASKS
    from graphs.plan import Task, TaskKind
    from emulate.planner.deployment import deployment
    from emulate.planner.prediction import _config

    rate = {1.0: 1e10}
    dev = Device("toy", {"fp32": 1e30}, bandwidth=2e9, memory=1e12, efficiency=1.0, call_overhead_s=0.0,
                 attention_flops=rate, masked_attention={"causal": rate, "explicit": rate})
    gqa, m = _config("tiny-mistral"), 512
    H, dh = gqa.heads, gqa.head_dim
    assert gqa.kv_heads < H
    fields = deployment(gqa, "cpu", dev, 1, "bf16", "nvlink", 4)
    assert fields["kv_repeat_bytes"] == 2 * (H + gqa.kv_heads) * dh * 4 and fields["score_flops"] == 4 * H * dh
    assert "kv_repeat_bytes" not in deployment(replace(gqa, kv_heads=H), "cpu", dev, 1, "bf16", "nvlink", 4)
    assert "kv_repeat_bytes" not in deployment(gqa, "h100", DEVICES["h100"], 1, "bf16", "nvlink", 2)
    t = Task(0, TaskKind.ROW, 0, 0, [], [], [])
    blocks, counts = [0] * len(MASKS), [0] * len(MASKS)
    causal, explicit = 3 * 4 * H * dh * m * m, 4 * H * dh * 300 * 128  # three causal blocks; tiles holding 300 keys
    for mask, flops, n in (("causal", causal, 3), ("explicit", explicit, 1)):
        i = [x.value for x in MASKS].index(mask)
        blocks[i], counts[i] = flops, n
    t.attend_blocks, t.attend_counts, t.pairs = blocks, counts, 4
    t.flops = t.attend_flops = sum(blocks)
    plain = Hardware(dev, 1, 1, 8.0, 0.0, 0.0, "fp32")
    grouped = replace(plain, **{k: v for k, v in fields.items() if k in ("kv_repeat_bytes", "score_flops")})
    copied = (3 * m + 300) * 2 * (H + gqa.kv_heads) * dh * 4  # read from the KV heads, written to every query head
    assert task_seconds(t, grouped) - task_seconds(t, plain) == pytest.approx(copied / 2e9)


@pytest.mark.parametrize("pattern", [Pattern("sliding", window=64), Pattern("sliding", window=300),
                                     Pattern("sliding", window=1000), Pattern("sink", window=512, sinks=4)])
@pytest.mark.parametrize("m", [1000, 1024, 2048])
def test_the_repeated_keys_are_the_boxes_of_the_tiles_the_kernel_masks(pattern, m):
    """The keys the planner counts for a window's tiled call (costs.repeated_keys, from its kernel
    scores) against the boxes the kernel copies: the tiles it runs masked (attend_intervals, by
    graphs.patterns.tile_seen). Blocks
    at least as long as the window: with a longer window some tiles see their whole box and copy
    nothing, where the count is an upper bound."""
    from emulate.planner.costs import repeated_keys
    from graphs import MaskKind
    from graphs.patterns import TILE_ROWS, kernel_entries, pair_mask, relative_range, tile_boxes, tile_seen

    for span, keys in (((m, 2 * m), (m, 2 * m)), ((m, 2 * m), (0, m))):
        mask = pair_mask(pattern, span, keys).kind
        if mask != MaskKind.EXPLICIT:
            continue
        lo, hi, sink = relative_range(pattern, span, keys)
        copied = 0
        for i, (a, b) in enumerate(zip(*tile_boxes(lo, hi, sink, m))):
            rows = slice(i * TILE_ROWS, min(m, (i + 1) * TILE_ROWS))
            # the kernel's own rule (emulate/runtime/kernels.py, attend_intervals): a masked tile copies its box
            copied += (b - a) if a < b and not tile_seen(lo, hi, sink, rows, a, b).all() else 0
        assert repeated_keys("explicit", kernel_entries(pattern, mask, span, keys), 1) == pytest.approx(copied, rel=0.05)
