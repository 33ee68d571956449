"""The planner's validation set (benchmarks/plan_validation.py) covers what docs/planner.md says it
does; no row is a problem the planner's constants were measured on (the CPU calibration's probe
forwards, emulate/planner/calibrate.py; Ray's, benchmarks/ray_overheads.py); and --neighbour's busy
process runs while its block runs and is gone after it, however the block ends."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rows_cover_patterns_sizes_and_executors():
    rows = load("plan_validation").ROWS
    assert len(rows) >= 12
    assert {p["attention"] for *_, p, _ in rows} == {"full", "causal", "sliding", "sink"}
    assert min(n for _, n, *_ in rows) == 4096 and max(n for _, n, *_ in rows) == 262144
    assert {ex for *_, ex in rows} == {"local", "local1", "ray1", "ray2"}


def test_no_row_is_a_problem_the_ray_constants_were_measured_on():
    rows = {(m, n, b, tuple(sorted(p.items()))) for m, n, b, p, _ in load("plan_validation").ROWS}
    measured = {(m, n, b, tuple(sorted(p.items()))) for m, n, b, p in load("ray_overheads").CASES}
    assert measured and not rows & measured


def test_no_row_is_a_forward_the_cpu_calibration_runs():
    from emulate.planner.calibrate import KERNEL_PROBE, PROBE, PROBE_FORWARDS

    rows = load("plan_validation").ROWS
    probes = {(m, n, b, a) for m, n, b, a in (*PROBE_FORWARDS, KERNEL_PROBE)}
    assert probes and not {(m, n, b, p["attention"]) for m, n, b, p, _ in rows} & probes
    assert PROBE not in {m for m, *_ in rows}
    # nor a decode row (benchmarks/plan_decode_validation.py): the calibration generates nothing, and
    # its forwards are the probe model's, never a decode row's model
    decode = load("plan_decode_validation").ROWS
    assert decode and PROBE not in {m for m, *_ in decode}
    assert not {(m, n, b, p.get("attention", "auto")) for m, n, b, _, p in decode} & probes


def test_the_neighbour_is_one_busy_child_for_the_block_and_is_gone_after_it():
    bench = load("plan_validation")
    with bench.neighbour(False) as none:
        assert none is None
    with bench.neighbour(True) as busy:
        child = psutil.Process(busy.pid)
        assert child.ppid() == psutil.Process().pid and busy.poll() is None
        assert child.cpu_times().user > 0.02  # it spins before anything is measured (a share of a busy core)
    assert busy.returncode is not None and not psutil.pid_exists(busy.pid)  # killed and reaped
    with pytest.raises(RuntimeError), bench.neighbour(True) as busy:
        raise RuntimeError("a row failed")
    assert busy.returncode is not None and not psutil.pid_exists(busy.pid)  # on an error too


def test_the_neighbour_ends_by_itself_when_the_benchmark_is_killed_outright(tmp_path):
    """A real child runs the benchmark's neighbour and is SIGKILLed (no finally runs): its busy loop
    notices and ends."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "hold.py"
    script.write_text(f"import importlib.util, sys, time\n"
                      f"spec = importlib.util.spec_from_file_location('pv', {str(ROOT / 'benchmarks' / 'plan_validation.py')!r})\n"
                      "pv = importlib.util.module_from_spec(spec); spec.loader.exec_module(pv)\n"
                      "with pv.neighbour(True) as busy:\n    print(busy.pid, flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(holder.stdout.readline())
    assert psutil.pid_exists(pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("script, args", [("plan_validation.py", ["--repeat", "0"]),
                                          ("calibration_coverage.py", ["--seconds", "0"]),
                                          ("calibration_coverage.py", ["--seconds", "nan"]),
                                          ("plan_decode_validation.py", ["--repeat", "0"])])
def test_a_benchmark_refuses_a_bad_count_in_one_line_before_measuring(script, args):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert f"{args[0]} must be" in last and "got" in last and "Traceback" not in out.stderr
