"""The CPU calibration: one-thread rates of the executor's own kernels, the fastest of several
rounds, recorded with when, under what load and which settings; its warnings (busy, old, other
settings), a corrupt cache measured again, and the line every cpu plan prints."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from emulate.planner import cpu_device, predict
from emulate.planner.calibrate import (BUSY_MARGIN, CACHE_FORMAT, NODE_SHAPES, NODE_TOKENS, READ_SHAPES, STALE_S,
                                       cache_path, calibrate_cpu, calibration_warnings, current_settings)
from emulate.planner.costs import Calibration
from tests.test_hardening import CHILD_ENV, EMULATE
from tests.test_planner import FAKE, fake_calibration

NOW = 1.8e9


def calibration(**changes) -> Calibration:
    base = dict(when=NOW - 3600, load=0.2, load_after=0.3, cores=2, torch="2.0", torch_threads=2)
    return Calibration(**{**base, **changes})


SETTINGS = {"torch": "2.0", "cores": 2, "torch_threads": 2}


def test_a_quiet_recent_calibration_under_these_settings_has_no_warning():
    assert calibration_warnings(calibration(), now=NOW, settings=SETTINGS) == []
    # the threshold: the cores less BUSY_MARGIN
    assert calibration_warnings(calibration(load=2 - BUSY_MARGIN), now=NOW, settings=SETTINGS) == []


def test_a_busy_old_or_foreign_calibration_is_flagged():
    (busy,) = calibration_warnings(calibration(load=4.0), now=NOW, settings=SETTINGS)
    assert "busy" in busy and "load average 4.00 on 2 cores" in busy and "--recalibrate" in busy
    (old,) = calibration_warnings(calibration(when=NOW - STALE_S - 86400), now=NOW, settings=SETTINGS)
    assert "8 days old" in old
    (other,) = calibration_warnings(calibration(), now=NOW, settings={**SETTINGS, "torch": "2.1"})
    assert "other settings" in other and "torch 2.0" in other and "torch 2.1" in other
    assert len(calibration_warnings(calibration(load=9, when=0, cores=8), now=NOW, settings=SETTINGS)) == 3


def test_the_real_calibration_records_the_clock_load_and_settings_it_ran_under():
    ticks = iter(range(100, 200))
    t0 = time.perf_counter()
    m = calibrate_cpu(budget_s=1.0, clock=lambda: float(next(ticks)), loadavg=lambda: (3.5, 0.0, 0.0))
    assert time.perf_counter() - t0 < 120  # a hang guard, not a speed goal
    cal = Calibration(**m["calibration"])
    assert cal.when == 100.0 and cal.load == 3.5 and cal.load_after == 3.5 and cal.seconds == 1.0
    assert (cal.torch, cal.cores, cal.torch_threads) == tuple(current_settings()[k] for k in
                                                              ("torch", "cores", "torch_threads"))
    assert cal.call_threads == 1
    for mask in ("none", "causal", "explicit"):
        assert len(m["attention_flops"][mask]) >= 3 and all(r > 0 for _, r in m["attention_flops"][mask])
    assert 0 < m["call_overhead_s"] < 0.01 and m["bandwidth"] > 1e8 and m["contention"][0] == 1.0
    # the per-call wall cost with k = 1 .. cores call workers, the first the one-worker figure
    assert len(m["serial_call_s"]) == len(m["contention"]) and m["serial_call_s"][0] == m["call_overhead_s"]
    assert all(0 < c < 0.01 for c in m["serial_call_s"])
    # ... and beside kernels (the kernel probe): never below it, the one-worker figure the same
    assert len(m["loaded_call_s"]) == len(m["serial_call_s"]) and m["loaded_call_s"][0] == m["serial_call_s"][0]
    assert all(a >= b for a, b in zip(m["loaded_call_s"], m["serial_call_s"]))
    # Ray's workers as processes at its niceness, held against one thread of this process alone
    assert len(m["worker_contention"]) == len(m["contention"]) and all(f >= 1.0 for f in m["worker_contention"])
    assert cal.others_cores >= 0.0
    # the executor's merge, elementwise: measured at each size, below the largest GEMM's rate
    # the position-wise nodes at every M of NODE_TOKENS for every shape of NODE_SHAPES
    assert sorted(int(t) for t, _, _ in m["node_flops"]) == sorted(NODE_TOKENS * len(NODE_SHAPES))
    assert all(r > 0 for _, _, r in m["node_flops"])
    # cold reads of every READ_SHAPES matrix by one token's linear; a copy's reads and writes
    assert [n for n, _ in m["read_rates"]] == [4 * r * c for r, c in READ_SHAPES]
    assert all(r > 0 for _, r in m["read_rates"]) and m["bandwidth"] > 0
    assert 0.2 < m["kernel_probe_miss"] < 5  # the probe forward, measured over simulated: a ratio, not fitted
    assert len(m["merge_flops"]) == 4 and all(0 < r < max(r for _, r in m["matmul_flops"]) for _, r in m["merge_flops"])


def test_a_corrupt_or_old_cache_is_measured_again_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu", fake_calibration)
    notes = []
    for text in ("{not json", json.dumps({"4": {"matmul_flops": []}}), json.dumps({"format": CACHE_FORMAT})):
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        cache_path().write_text(text)
        dev = cpu_device(note=notes.append)
        assert dev.call_overhead_s == FAKE["call_overhead_s"]
        assert json.loads(cache_path().read_text())["format"] == CACHE_FORMAT  # rewritten whole
    assert len(notes) == 3 and "unreadable" in notes[0] and "older format" in notes[1] and "unreadable" in notes[2]
    cpu_device(note=notes.append)
    assert len(notes) == 3  # a good cache is read silently


def test_the_local_executor_is_its_call_workers_sharing_one_process(tmp_path, monkeypatch):
    """--threads 2: two call workers on one queue, nothing moved between them; faster than one,
    by less than 2x (the calibrated contention of two workers at once, 1.2, on the kernels; the
    calls' Python at the per-call cost measured with two workers, 3e-5 s, one worker's at a time;
    and the critical path)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("emulate.planner.calibrate.calibrate_cpu", fake_calibration)
    one = predict("tiny-llama", 8192, block_size=512, attention="causal", executor="local", threads=1)
    two = predict("tiny-llama", 8192, block_size=512, attention="causal", executor="local", threads=2)
    assert one.inputs["call_workers"] == 1 and two.inputs["call_workers"] == 2
    assert two.bytes_moved == 0 and len(two.worker_busy_s) == 2
    assert one.predicted_s / 2 < two.predicted_s < one.predicted_s
    calls = one.inputs["logical_calls"]
    kernels = sum(one.worker_busy_s) - calls * 2e-5
    assert sum(two.worker_busy_s) == pytest.approx(1.2 * kernels + calls * 3e-5, rel=1e-9)
    assert two.predicted_s >= calls * 3e-5  # the calls' Python never overlaps


def test_every_cpu_plan_prints_its_calibration_and_warns_on_stderr(tmp_path):
    """A real child: the cache says load 3.9 on this machine's cores and an old torch."""
    cached = {**FAKE, "calibration": {**FAKE["calibration"], "load": 3.9}}
    (tmp_path / "emulate").mkdir()
    (tmp_path / "emulate" / "cpu-calibration.json").write_text(json.dumps(cached))
    env = dict(CHILD_ENV, XDG_CACHE_HOME=str(tmp_path))
    done = subprocess.run([str(EMULATE), "plan", "--random-tokens", "2048", "-M", "256", "--executor", "local"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("cpu ")]
    assert "calibrated 2001-09-09" in line and "load average 3.90 on 2 cores" in line and "torch x" in line
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 3 and "busy" in warnings[0] and "days old" in warnings[1] and "other settings" in warnings[2]
    assert all(w.startswith("emulate: warning: ") for w in warnings)


def test_a_busy_neighbour_is_seen_at_once_and_flagged(tmp_path):
    """`_others_cores` counts what other processes use while the calibration sleeps: a busy child
    shows as most of a core (the 1-minute load average would take a minute to show it)."""
    import sys

    from emulate.planner.calibrate import _others_cores

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert _others_cores(0.5) > 0.5
    finally:
        busy.kill()
        busy.wait()
    (flag,) = calibration_warnings(calibration(others_cores=1.0), now=NOW, settings=SETTINGS)
    assert "busy" in flag and "other processes using 1.0" in flag
    assert "(other processes using 1.0)" in calibration(others_cores=1.0).describe()


def hardware_with(tmp_path, monkeypatch, others: float, **kw):
    from emulate.planner.prediction import hardware

    cached = {**FAKE, "calibration": {**FAKE["calibration"], "others_cores": others}}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / str(others)))
    cache_path().parent.mkdir(parents=True, exist_ok=True)
    cache_path().write_text(json.dumps(cached))
    monkeypatch.setattr("emulate.runtime.threads.cores", lambda: 2)
    return hardware("cpu", **kw)


def test_ray_workers_take_the_process_contention_and_the_service_cost_of_the_cores_others_leave(tmp_path, monkeypatch):
    """Ray's workers run as processes at Ray's worker niceness (worker_contention, 1.3 in FAKE); the
    local executor's call workers as threads (contention, 1.2). The driver's and Ray's CPU per task
    (CPU_SERVICE_S_PER_CALL) comes out of the workers' time once they fill the cores other
    processes leave: two workers on two quiet cores, or one beside a neighbour using one core."""
    from emulate.planner.costs import CPU_SERVICE_S_PER_CALL

    quiet2 = hardware_with(tmp_path, monkeypatch, 0.0, workers=2, executor="ray")
    assert quiet2.slowdown == pytest.approx(1.3) and quiet2.service_s == pytest.approx(CPU_SERVICE_S_PER_CALL)
    assert hardware_with(tmp_path, monkeypatch, 0.0, executor="local", threads=2).slowdown == pytest.approx(1.2)
    assert hardware_with(tmp_path, monkeypatch, 0.0, workers=1, executor="ray").service_s == 0.0
    busy1 = hardware_with(tmp_path, monkeypatch, 1.0, workers=1, executor="ray")
    busy2 = hardware_with(tmp_path, monkeypatch, 1.0, workers=2, executor="ray")
    assert busy1.service_s == pytest.approx(CPU_SERVICE_S_PER_CALL)
    assert busy2.service_s == pytest.approx(2 * CPU_SERVICE_S_PER_CALL)


def test_the_simulation_charges_the_per_call_cost_measured_beside_kernels(tmp_path, monkeypatch):
    """loaded_call_s (the calls' Python while the call workers run kernels) is what a local plan
    charges, one call at a time across the call workers (one GIL): at 1 ms a call the plan takes
    at least every call's tenth of a second, and the kernels of the faster plan no more on top."""
    def plan(loaded):
        cached = {**FAKE, "loaded_call_s": loaded}
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / str(loaded[1])))
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        cache_path().write_text(json.dumps(cached))
        return predict("tiny-llama", 4096, block_size=256, attention="causal", executor="local", threads=2)
    base, slow = plan([2e-5, 3e-5]), plan([2e-5, 0.1])
    calls = base.inputs["logical_calls"]
    assert calls * 0.1 <= slow.predicted_s < calls * 0.1 + base.predicted_s
    assert base.predicted_s < calls * 0.1


@pytest.mark.parametrize("value", ["abc", "20", "-1"])
def test_a_ray_worker_niceness_ray_would_not_take_is_one_line_before_anything_is_measured(tmp_path, value):
    """A real child: RAY_worker_niceness set to what Ray refuses stops `emulate plan --recalibrate`
    with one line and exit 2, in well under the calibration's time, and writes no cache."""
    env = dict(CHILD_ENV, XDG_CACHE_HOME=str(tmp_path), RAY_worker_niceness=value)
    t0 = time.perf_counter()
    done = subprocess.run([str(EMULATE), "plan", "--random-tokens", "2048", "-M", "256", "--recalibrate"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "RAY_worker_niceness must be an integer from 0 to 19" in line and repr(value) in line
    assert "Traceback" not in done.stderr and not (tmp_path / "emulate").exists()
    assert time.perf_counter() - t0 < 60  # a hang guard: nothing was measured
