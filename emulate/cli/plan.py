"""`emulate plan`: a forward's predicted time on P workers, nothing run; the options and the printed
summary over the planner's prediction (emulate/planner/, docs/planner.md)."""
from __future__ import annotations

import argparse
import json
import sys

from emulate.cli.options import preset_names
from emulate.cli.parser import Help
from emulate.errors import EmulateError


def add_plan_command(sub) -> None:
    sub.add_parser(
        "plan", formatter_class=Help, help="predict a forward's time on P workers (nothing runs)",
        options=plan_options,
        description="Compile the graph in compact form, group and place its tasks as the Ray executor would, and "
                    "schedule them on P simulated workers with a cost model (GEMM and attention FLOP/s, memory "
                    "bandwidth, tensor-parallel all-reduces, link bandwidth and latency, per-task and per-call "
                    "overheads, memory per worker). Prints the predicted time, each worker's peak memory, the bytes "
                    "moved, utilisation and the critical path; a layout that does not fit a worker's memory is "
                    "refused, naming what would. --placement all prints the sequence, layers and grid placements side "
                    "by side. The cpu device is measured on this machine (15 to 30 s) and cached "
                    "with when and under what load it was measured, printed with every plan; docs/planner.md "
                    "explains the model and the source of every constant.",
        epilog="examples:\n"
               "  emulate plan --random-tokens 16384 -M 1024 --workers 2\n"
               "  emulate plan --shape llama3-8b --tokens 1048576 -M 4096 --attention causal --workers 8 --device h100\n"
               "  emulate plan --shape llama3-405b --tokens 1048576 -M 4096 --attention causal --workers 16 "
               "--gpus-per-worker 8 --weight-dtype fp8-ffn --device h100 --json\n"
               "  emulate plan --shape llama3-8b --tokens 1048576 -M 4096 --attention causal --workers 16 "
               "--gpus-per-worker 8 --device h100 --placement all\n"
               "  emulate plan --shape llama3-8b --tokens 131072 -M 4096 --attention causal --device h200 --plot p.png\n"
               "  emulate plan --shape llama3-405b --tokens 131072 -M 4096 --attention causal --new-tokens 64 "
               "--workers 2 --gpus-per-worker 8 --weight-dtype fp8-ffn --device h100")


def plan_options(p: argparse.ArgumentParser) -> None:
    """The options of `emulate plan`, added once the command is chosen (cli/parser.py, Parser)."""
    from emulate.models.shapes import SHAPES
    from emulate.planner.costs import DEVICES
    from emulate.planner.placements import CHOICES

    p.add_argument("--model", default=None, help=f"a preset ({preset_names()}) or a checkpoint directory "
                   "(default tiny-llama)")
    p.add_argument("--shape", default=None, choices=tuple(SHAPES), help="a published model shape instead of --model")
    p.add_argument("--tokens", "--random-tokens", dest="tokens", type=int, default=4096, metavar="N",
                   help="N, the tokens of the forward")
    p.add_argument("--block-size", "-M", type=int, default=256, help="M: the most tokens a small call sees")
    p.add_argument("--attention", default="auto", help="auto, full, causal, sliding, sink or sampled")
    p.add_argument("--window", type=int, default=None, help="sliding window r")
    p.add_argument("--sinks", type=int, default=None, help="attention sinks s")
    p.add_argument("--workers", type=int, default=1, help="P, the workers the tasks are placed on")
    p.add_argument("--device", choices=("cpu", *DEVICES), default="cpu",
                   help="cpu (this machine, measured) or a GPU from the datasheet table")
    p.add_argument("--gpus-per-worker", type=int, default=1,
                   help="GPUs per worker, tensor parallel inside it (an all-reduce per layer's attention and MLP)")
    p.add_argument("--tp-link", choices=("nvlink", "pcie"), default="nvlink",
                   help="the link the GPUs of a worker all-reduce over")
    p.add_argument("--weight-dtype", choices=("bf16", "fp8-ffn"), default="bf16",
                   help="bf16 weights, or the feed-forward weights in fp8 at the fp8 GEMM rate (h100, h200)")
    p.add_argument("--placement", choices=CHOICES, default="sequence",
                   help="sequence: every worker holds the model and runs its run of query blocks; layers: each worker "
                        "owns a range of layers and holds only their weights, blocks flowing through as a pipeline; "
                        "grid: P_layers x P_sequence workers, a row per range of layers splitting its blocks; "
                        "all: each side by side, with whether it fits")
    p.add_argument("--grid", default=None, metavar="LxS",
                   help="the grid placement's shape, P_layers x P_sequence workers (default: as the Ray executor "
                        "picks it, docs/cluster.md)")
    p.add_argument("--allow-overcommit", action="store_true",
                   help="predict a layout whose weights and values do not fit a worker's memory (refused otherwise)")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="each worker's network link in Gb/s (default 400 per GPU; 40 for cpu, Ray's object store)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray: the physical plan with Ray's per-task cost; local: the in-process executor")
    p.add_argument("--threads", default=None, type=_threads, metavar="N|auto",
                   help="the local executor's call workers, as `emulate run --threads` (default torch's setting)")
    p.add_argument("--recalibrate", "--calibrate", dest="recalibrate", action="store_true",
                   help="measure this machine's CPU again (about 30 s)")
    p.add_argument("--new-tokens", type=int, default=None, metavar="K",
                   help="predict generation instead of the forward: the time per output token of K new tokens after "
                        "the N-token prompt, each attending its visible key blocks in calls of at most M keys, "
                        "partials merged across workers (docs/planner.md, decode rows)")
    p.add_argument("--allow-past-positions", action="store_true",
                   help="with --new-tokens: go past a RoPE model's declared max_position_embeddings")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw predicted time against workers and against N, exact causal beside an O(N/M) pattern")
    p.set_defaults(handler=cmd_plan)


def _threads(text: str):
    return text if text == "auto" else int(text)


def cmd_plan(args) -> int:
    from emulate.planner.placements import ALL, describe_layout
    from emulate.planner.prediction import predict, predict_placements

    if args.shape is not None and args.model is not None:
        raise EmulateError("give --model or --shape, not both")
    if args.plot and args.placement != "sequence":
        raise EmulateError("--plot draws the sequence placement only; leave out --placement")
    model = args.shape or args.model
    if args.new_tokens is not None:
        return _decode(model, args)
    if args.plot:
        from emulate.outputs import output_target
        from graphs.pictures.coverage import DrawError, figure_format

        try:
            figure_format(args.plot)  # refused before any work
        except DrawError as err:
            raise EmulateError(str(err)) from None
        output_target(args.plot)  # a path that cannot be written (a directory, a name past NAME_MAX), too
    keywords = {"block_size": args.block_size, "attention": args.attention, "window": args.window,
                "sinks": args.sinks, "workers": args.workers, "device": args.device,
                "gpus_per_worker": args.gpus_per_worker, "link_gbps": args.link_gbps, "recalibrate": args.recalibrate,
                "executor": args.executor, "threads": args.threads, "weight_dtype": args.weight_dtype,
                "tp_link": args.tp_link, "grid": args.grid}
    if args.grid is not None and args.placement not in ("grid", ALL):
        raise EmulateError(f"--grid is the shape of --placement grid (or all), not of --placement {args.placement}")
    if args.placement == ALL:
        return _compare(predict_placements(model, args.tokens, placement=ALL, **keywords), args.json)
    p = predict(model, args.tokens, placement=args.placement, allow_overcommit=args.allow_overcommit, **keywords)
    _warn_calibration(p.inputs)
    if args.plot:
        from emulate.planner.plot import plot_scaling

        plot_scaling(args.plot, model, args.tokens, block_size=args.block_size, workers=args.workers,
                     device=args.device, gpus_per_worker=args.gpus_per_worker, link_gbps=args.link_gbps,
                     window=args.window, weight_dtype=args.weight_dtype, tp_link=args.tp_link)
        print(f"wrote {args.plot}", file=sys.stderr)
    d = p.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    path = d["critical_path"]
    shown = path if len(path) <= 6 else path[:3] + ["..."] + path[-2:]
    print(_header(d) +
          f"predicted  {d['predicted_s']:.4g} s; utilisation {d['utilisation']:.0%}; critical path "
          f"{d['critical_path_s']:.4g} s over {len(path)} tasks ({' > '.join(shown)})\n"
          + (f"placement  {d['placement']}: {describe_layout(d['layers'], d['workers'], d['placement'], d['grid'])}; "
             f"weights "
             f"{_spread(d['worker_weights_gb'])} GB and peak {_spread(d['worker_memory_gb'])} GB per worker\n"
             if d["placement"] != "sequence" else "") +
          f"memory     peak {d['peak_worker_memory_gb']:.3g} GB per worker (weights {d['weights_gb_per_worker']:.3g} GB)"
          + ("" if d["fits"] else ", MORE than the worker's devices hold") + f"; {d['bytes_moved'] / 1e9:.3g} GB moved "
          "between workers")
    return 0


def _decode(model, args) -> int:
    """`--new-tokens K`: the decode row (emulate/planner/decode.py, predict_decode)."""
    from emulate.planner.decode import predict_decode

    if args.plot:
        raise EmulateError("--plot draws the forward; leave it out with --new-tokens")
    if args.placement != "sequence":
        raise EmulateError("--new-tokens prices the sequence placement (the cache stays where the prefill made it); "
                           "leave out --placement")
    p = predict_decode(model, args.tokens, args.new_tokens, block_size=args.block_size, attention=args.attention,
                       window=args.window, sinks=args.sinks, workers=args.workers, device=args.device,
                       gpus_per_worker=args.gpus_per_worker, link_gbps=args.link_gbps, recalibrate=args.recalibrate,
                       weight_dtype=args.weight_dtype, tp_link=args.tp_link, allow_overcommit=args.allow_overcommit,
                       allow_past_positions=args.allow_past_positions)
    d = p.to_dict()
    _warn_calibration(d)
    if args.json:
        print(json.dumps(d))
        return 0
    parts = ", ".join(f"{k} {1000 * v:.3g}" for k, v in d["parts"].items())
    cal = d.get("calibration")
    from emulate.planner.costs import Calibration

    print(f"decode     {d['model']}, {d['new_tokens']} new tokens after N = {d['tokens']}, M = {d['block_size']}, "
          f"{d['layers']} layers, attention {', '.join(d['attention'])}\n"
          f"hardware   {d['workers']} worker(s) x {d['gpus_per_worker']} {d['device']} ({d['dtype']}"
          + (", fp8 feed-forward" if d["weight_dtype"] == "fp8-ffn" else "")
          + (f", tensor parallel over {d['tp_link']}" if d.get("tp_link") else "") + ")"
          + (f", link {d['link_gbps']:g} Gb/s" if d["workers"] > 1 else "")
          + (", local executor" if d.get("executor") == "local" else "") + "\n"
          + (f"cpu        {Calibration(**cal).describe()}\n" if cal else "") +
          f"predicted  {d['ms_per_token']:.4g} ms per output token ({parts} ms)\n"
          f"calls      {d['calls_per_token']:.4g} per token, {d['attention_calls_per_token']:.4g} of them pair calls; "
          f"{d['hops_per_token']:.3g} link hops per token\n"
          f"bytes      {d['weight_bytes_per_token'] / 1e9:.4g} GB of weights and {d['kv_bytes_per_token'] / 1e9:.4g} GB "
          f"of keys and values read per token\n"
          f"memory     peak {d['peak_worker_memory_gb']:.4g} GB per worker (weights {d['weights_gb_per_worker']:.4g} GB, "
          f"cache {max(d['kv_gb_per_worker']):.4g} GB)" + ("" if d["fits"] else ", MORE than the worker's devices hold"))
    return 0


def _header(d: dict) -> str:
    """The forward and hardware lines of every plan (and the cpu's calibration)."""
    from emulate.planner.costs import Calibration

    return (f"forward    {d['model']}, N = {d['tokens']} in {d['blocks']} blocks of M = {d['block_size']}, "
          f"{d['layers']} layers, attention {', '.join(d['attention'])}; {d['attention_calls']} attention calls in "
          f"{d['physical_tasks']} physical tasks\n"
          f"hardware   {d['workers']} worker(s) x {d['gpus_per_worker']} {d['device']} ({d['dtype']}"
          + (", fp8 feed-forward" if d["weight_dtype"] == "fp8-ffn" else "")
          + (f", tensor parallel over {d['tp_link']}" if d.get("tp_link") else "") + "), link "
          f"{d['link_gbps']:g} Gb/s, {d['executor']} executor"
          + (f" ({d['call_workers']} call worker{'s' if d['call_workers'] > 1 else ''} of one thread each)"
             if d.get("call_workers") else "") + "\n"
          + (f"cpu        {Calibration(**d['calibration']).describe()}\n" if d.get("calibration") else ""))


def _warn_calibration(inputs: dict) -> None:
    if inputs.get("calibration"):
        import time

        from emulate.planner.calibrate import calibration_warnings, current_settings
        from emulate.planner.costs import Calibration

        cal = Calibration(**inputs["calibration"])
        for warning in calibration_warnings(cal, now=time.time(), settings=current_settings()):
            print(f"emulate: warning: {warning}", file=sys.stderr)


def _compare(outcomes, as_json: bool) -> int:
    """`--placement all`: the placements side by side, one row each, and the ratio of their times."""
    rows = [o.to_dict() for o in outcomes]
    if as_json:
        print(json.dumps({"placements": rows}))
        return 0
    first = next(r for r in rows if "predicted_s" in r)
    _warn_calibration(first)
    lines = [_header(first).rstrip("\n"),
             (f"{'placement':<10} {'predicted_s':>11} {'utilisation':>11} {'moved_GB':>9} {'weights_GB':>15} "
              f"{'peak_GB':>15}  fits")]
    for r in rows:
        if "predicted_s" not in r:
            lines.append(f"{r['placement']:<10} cannot lay out this forward: {r['refusal']}")
            continue
        weights, peaks = r["worker_weights_gb"], r["worker_memory_gb"]
        name = f"grid {r['grid']}" if r.get("grid") else r["placement"]
        lines.append(f"{name:<10} {r['predicted_s']:>11.4g} {r['utilisation']:>11.0%} "
                     f"{r['bytes_moved'] / 1e9:>9.4g} {_spread(weights):>15} {_spread(peaks):>15}  "
                     + ("yes" if r["fits"] else "no: " + (r["refusal"] or "")))
    lines.append("(weights_GB and peak_GB per worker, least to most; bytes moved between workers)")
    done = {r["placement"]: r for r in rows if "predicted_s" in r}
    if len(done) > 1:
        fastest = min(done, key=lambda name: done[name]["predicted_s"])
        lines.append(f"ratio      predicted time / the fastest's ({fastest}): " + ", ".join(
            f"{name} {r['predicted_s'] / done[fastest]['predicted_s']:.3g}" for name, r in done.items()
            if name != fastest))
    print("\n".join(lines))
    return 0


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{hi:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g} to {hi:.3g}"
