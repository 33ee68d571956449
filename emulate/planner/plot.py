"""`emulate plan --plot`: predicted time against workers and against N, exact causal attention beside
a sliding window, as a PNG or SVG; and `plot_validation`, predicted against measured time (the
scatter benchmarks/plan_validation.py draws). Log axes carry plain tick labels (2, 16, 65,536; 0.5,
30 s), never powers of ten. matplotlib comes in through graphs/pictures/coverage.py, imported only
when a plot is drawn."""
from __future__ import annotations

from emulate.errors import EmulateError
from emulate.planner.prediction import hardware, predict


def plain(value: float, _pos=None) -> str:
    """A tick label as a reader writes it: 16, 65,536, 0.5, 0.02 (3 significant digits at most)."""
    if value <= 0:
        return ""
    if value >= 1 and abs(value - round(value)) < 1e-9 * value:
        return f"{round(value):,}"
    return f"{value:.3g}"


def plain_log_axes(ax) -> None:
    """Log axes with plain labels on the decades and, between them, on 2x and 5x (no 3x10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(plain))
        axis.set_minor_formatter(NullFormatter())


def plot_scaling(path, model, tokens: int, *, block_size: int, workers: int, device: str = "cpu",
                 gpus_per_worker: int = 1, link_gbps: float | None = None, window: int | None = None,
                 weight_dtype: str = "bf16", tp_link: str = "nvlink") -> dict:
    """Predicted time against workers (at N = tokens) and against N (at P = workers), for exact
    causal attention and a sliding window (O(N/M) calls; window M unless given). PNG or SVG.
    Points whose layout would not fit memory are drawn all the same (allow_overcommit)."""
    from graphs.pictures.coverage import DrawError, figure_format, new_figure, save_figure

    try:
        figure_format(path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    r = block_size if window is None else window
    modes = {"causal (exact)": {"attention": "causal"},
             f"sliding r={r} (O(N/M))": {"attention": "sliding", "window": r}}
    ps = sorted({1 << k for k in range(8) if 1 << k <= max(16, 4 * workers)} | {workers})
    ns = sorted({n for n in (tokens >> k for k in range(6)) if n >= block_size} | {tokens})
    common = {"block_size": block_size, "device": device, "gpus_per_worker": gpus_per_worker,
              "link_gbps": link_gbps, "weight_dtype": weight_dtype, "tp_link": tp_link, "allow_overcommit": True}
    hw_cache = {}

    def run(n, p, keywords):
        if p not in hw_cache:
            hw_cache[p] = hardware(device, p, gpus_per_worker, link_gbps)
        return predict(model, n, workers=p, hw=hw_cache[p], **common, **keywords).predicted_s

    curves = {name: ([run(tokens, p, kw) for p in ps], [run(n, workers, kw) for n in ns]) for name, kw in modes.items()}
    fig = new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    for name, (by_p, by_n) in curves.items():
        left.plot(ps, by_p, marker="o", label=name)
        right.plot(ns, by_n, marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="workers P", ylabel="predicted forward (s)",
             title=f"N = {tokens:,}, M = {block_size:,}")
    right.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="predicted forward (s)",
              title=f"P = {workers} x {gpus_per_worker} {device}")
    for ax in (left, right):
        plain_log_axes(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    try:
        save_figure(fig, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    return {"workers": ps, "tokens": ns, "curves": curves, "figure": fig}


def plot_validation(path, rows: list[tuple[str, float, float]], title: str) -> object:
    """Predicted against measured seconds, one labelled point per (label, predicted, measured) row,
    with the diagonal and a band of +-20%; log axes with plain labels. Returns the Figure."""
    from graphs.pictures.coverage import DrawError, new_figure, save_figure

    fig = new_figure(6, 5.5)
    ax = fig.subplots()
    lo = min(min(p, m) for _, p, m in rows) / 1.5
    hi = max(max(p, m) for _, p, m in rows) * 1.5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo / 1.2, hi / 1.2], [lo * 1.2, hi * 1.2], color="grey", alpha=0.15, label="within 20%")
    for label, predicted, measured in rows:
        ax.plot(measured, predicted, marker="o", ls="none")
        ax.annotate(label, (measured, predicted), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured forward (s)",
           ylabel="predicted forward (s)", title=title)
    plain_log_axes(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    try:
        save_figure(fig, path)
    except DrawError as err:
        raise EmulateError(str(err)) from None
    return fig
