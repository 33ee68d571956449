"""`emulate plan --plot` and the validation scatter: log axes read back with plain tick labels."""
from __future__ import annotations

import pytest

from emulate.planner.plot import plain, plot_scaling, plot_validation


def labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


@pytest.mark.parametrize("value,text", [(16, "16"), (65536, "65,536"), (0.5, "0.5"), (30, "30"), (2e-2, "0.02"),
                                        (1.5, "1.5")])
def test_plain_labels(value, text):
    assert plain(value) == text


def test_the_scaling_plot_has_plain_tick_labels(tmp_path):
    out = tmp_path / "p.svg"
    drawn = plot_scaling(out, "llama3.2-1b", 32768, block_size=4096, workers=2, device="h200")
    left, right = drawn["figure"].axes
    for ax in (left, right):
        for axis in (ax.xaxis, ax.yaxis):
            shown = labels(axis)
            assert shown, axis
            assert not any("^" in s or "times" in s or "$" in s for s in shown), shown
    assert {"1", "2", "5", "10"} <= set(labels(left.xaxis))
    assert "20,000" in labels(right.xaxis) or "10,000" in labels(right.xaxis)
    assert out.read_text().startswith("<?xml")


def test_the_validation_scatter_has_plain_tick_labels(tmp_path):
    fig = plot_validation(tmp_path / "v.png", [("a", 0.8, 1.0), ("b", 12.0, 10.0), ("c", 40.0, 45.0)], "t")
    (ax,) = fig.axes
    assert {"1", "2", "5", "10", "20"} <= set(labels(ax.xaxis)) and {"1", "10"} <= set(labels(ax.yaxis))
    assert not any("^" in s or "$" in s for s in labels(ax.xaxis) + labels(ax.yaxis))
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
