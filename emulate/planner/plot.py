"""`emulate plan --plot`: predicted time against workers and against N, exact causal attention beside
a sliding window, as a PNG or SVG. matplotlib comes in through graphs/pictures/coverage.py, imported
only when a plot is drawn."""
from __future__ import annotations

from emulate.errors import EmulateError
from emulate.planner.prediction import hardware, predict


def plot_scaling(path, model, tokens: int, *, block_size: int, workers: int, device: str = "cpu",
                 gpus_per_worker: int = 1, link_gbps: float | None = None, window: int | None = None) -> dict:
    """Predicted time against workers (at N = tokens) and against N (at P = workers), for exact
    causal attention and a sliding window (O(N/M) calls; window M unless given). PNG or SVG."""
    from graphs.pictures.coverage import DrawError, figure_format, new_figure, save_figure

    try:
        figure_format(path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    r = block_size if window is None else window
    modes = {"causal (exact)": dict(attention="causal"), f"sliding r={r} (O(N/M))": dict(attention="sliding", window=r)}
    ps = sorted({1 << k for k in range(0, 8) if 1 << k <= max(16, 4 * workers)} | {workers})
    ns = sorted({n for n in (tokens >> k for k in range(6)) if n >= block_size} | {tokens})
    common = dict(block_size=block_size, device=device, gpus_per_worker=gpus_per_worker, link_gbps=link_gbps)
    hw_cache = {}

    def run(n, p, keywords):
        key = p
        if key not in hw_cache:
            hw_cache[key] = hardware(device, p, gpus_per_worker, link_gbps)
        return predict(model, n, workers=p, hw=hw_cache[key], **common, **keywords).predicted_s

    curves = {name: ([run(tokens, p, kw) for p in ps], [run(n, workers, kw) for n in ns]) for name, kw in modes.items()}
    fig = new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    for name, (by_p, by_n) in curves.items():
        left.plot(ps, by_p, marker="o", label=name)
        right.plot(ns, by_n, marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="workers P", ylabel="predicted forward (s)",
             title=f"N = {tokens}, M = {block_size}")
    right.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="predicted forward (s)",
              title=f"P = {workers} x {gpus_per_worker} {device}")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    try:
        save_figure(fig, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    return {"workers": ps, "tokens": ns, "curves": curves}
