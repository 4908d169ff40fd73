"""``featkd plot``: figures (PNG + PDF) from run directories.

    featkd plot ablation runs/repro/nst-kernels/*  --by method --out figs/kernels
    featkd plot sweep    runs/t-sweep --x kd.options.T --xlabel "temperature T" --out figs/temperature
    featkd plot sweep    runs/w-sweep --x terms.0.weight --logx --xlabel "NST weight λ" --out figs/lambda
    featkd plot curves   runs/demo/demo/* --out figs/curves
    featkd plot attention --teacher runs/t/last.pt --student runs/s/last.pt --out figs/attention
    featkd plot datasize runs/repro/limited-data-*.json --out figs/datasize
    featkd plot deltas   runs/repro/limited-data-0.01-fashion_mnist.json --table tuned --out figs/deltas-tuned

A sweep directory stands for its members (``members/<name>/``); any other argument is one run
directory (``metrics.jsonl`` + ``config.yaml``). Values are those of the last epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{ablation,sweep,curves,attention,datasize,deltas}")
    ablation = kinds.add_parser("ablation", help="metric per method/kernel with error bars over seeds")
    sweep = kinds.add_parser("sweep", help="metric against a swept hyper-parameter (λ, T, ...)")
    curves = kinds.add_parser("curves", help="every named loss and the accuracy against the epoch")
    for sub in (ablation, sweep, curves):
        sub.add_argument("runs", nargs="+", type=Path, help="run or sweep directories")
        sub.add_argument("--out", type=Path, required=True, help="output path without suffix (writes .png and .pdf)")
        sub.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    for sub in (ablation, sweep):
        sub.add_argument("--metric", default="student/acc1", help="metric key (default: student/acc1)")
        sub.add_argument("--teacher", type=Path, help="a teacher run directory, drawn as a reference line")
        sub.add_argument("--title")
    ablation.add_argument("--by", default="method", help="config key naming each group (default: method); "
                                                         "a group called 'student' becomes the reference line")
    sweep.add_argument("--x", required=True, help="config key on the x axis, e.g. kd.options.T or terms.0.weight")
    sweep.add_argument("--series", help="config key separating lines (default: one line)")
    sweep.add_argument("--xlabel")
    sweep.add_argument("--logx", action="store_true")
    curves.add_argument("--keys", nargs="+", help="metrics to plot (default: every train/* loss and */acc1)")
    datasize = kinds.add_parser("datasize", help="test accuracy against the students' share of the data, "
                                                 "with 95%% bands (from featkd repro limited-data results)")
    datasize.add_argument("results", nargs="+", type=Path, help="the .json files written next to each table")
    datasize.add_argument("--out", type=Path, required=True, help="output path without suffix (writes .png and .pdf)")
    datasize.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    datasize.add_argument("--title")
    deltas = kinds.add_parser("deltas", help="each method's paired Δ vs the student with its 95%% interval and "
                                             "verdict (one table of featkd repro limited-data results)")
    deltas.add_argument("result", type=Path, help="the .json file written next to the table")
    deltas.add_argument("--table", choices=("published", "tuned"), default="published",
                        help="the published settings' table, or the tuned one's (default: published)")
    deltas.add_argument("--out", type=Path, required=True, help="output path without suffix (writes .png and .pdf)")
    deltas.add_argument("--overwrite", action="store_true", help="replace existing figure files")
    deltas.add_argument("--title")
    attention = kinds.add_parser("attention", help="teacher vs student AT attention maps for a few test images")
    attention.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (.pt)")
    attention.add_argument("--student", required=True, help="student checkpoint (.pt), or CKPT:name for one of several")
    attention.add_argument("--data", default="fashion_mnist", help="dataset name for load_dataset")
    attention.add_argument("--root", default=None, help="dataset folder")
    attention.add_argument("--count", type=int, default=4, help="number of test images")
    attention.add_argument("--teacher-layers", nargs="+", help="default: the teacher's default distillation layers")
    attention.add_argument("--student-layers", nargs="+", help="default: the student's default distillation layers")
    attention.add_argument("--out", type=Path, required=True)
    attention.add_argument("--overwrite", action="store_true")


def expand_runs(paths) -> list:
    """Load run directories; a sweep directory stands for its members."""
    from featkd import plots
    from featkd.sweep import MEMBERS_DIR

    runs = []
    for path in paths:
        members = Path(path) / MEMBERS_DIR
        if members.is_dir():
            runs += [plots.load_run(p) for p in sorted(members.iterdir()) if p.is_dir()]
        else:
            runs.append(plots.load_run(path))
    return runs


def _teacher_value(path, metric_hint: str):
    from featkd import plots

    if path is None:
        return None
    run = plots.load_run(path)
    keys = [k for k in run.metrics[-1] if k.endswith("/acc1")]
    if not keys:
        raise ValueError(f"teacher run {path} has no */acc1 metric")
    return plots.final_metric(run, "teacher/acc1" if "teacher/acc1" in keys else keys[0])


def run(args: argparse.Namespace) -> int:
    from featkd.commands._common import reports_user_errors

    return reports_user_errors(_run, also=(KeyError,))(args)  # plots name a missing metric or key with KeyError


def _run(args: argparse.Namespace) -> int:
    from featkd import plots

    if args.kind == "attention":
        fig = _attention_figure(args)
    elif args.kind == "datasize":
        from featkd.repro.limited_data import load_results

        fig = plots.data_size_curve(load_results(args.results), title=args.title)
    elif args.kind == "deltas":
        fig = _deltas_figure(args)
    elif args.kind == "curves":
        runs = expand_runs(args.runs)
        curves = {}
        for r in runs:
            keys = args.keys or [k for k in r.metrics[-1] if k.startswith("train/") or k.endswith("/acc1")]
            curves[r.name] = {k: plots.metric_series(r, k) for k in keys if any(k in row for row in r.metrics)}
        fig = plots.training_curves(curves)
    else:
        runs = expand_runs(args.runs)
        teacher = _teacher_value(args.teacher, args.metric)
        ylabel = "test accuracy (%)" if args.metric.endswith("acc1") else args.metric
        if args.kind == "ablation":
            groups = plots.group_final(runs, args.by, args.metric)
            student = groups.pop("student", None)
            fig = plots.kernel_ablation(groups, student=student, teacher=teacher, ylabel=ylabel, title=args.title)
        else:
            series: dict = {}
            for r in runs:
                label = str(plots.config_value(r.config, args.series, "?")) if args.series else args.metric
                x = plots.config_value(r.config, args.x)
                if x is None:
                    raise KeyError(f"run {r.path} has no config key {args.x!r}")
                series.setdefault(label, {}).setdefault(float(x), []).append(plots.final_metric(r, args.metric))
            fig = plots.sweep_plot(series, xlabel=args.xlabel or args.x, ylabel=ylabel, logx=args.logx,
                                   teacher=teacher, title=args.title)
    for path in plots.save_figure(fig, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def _deltas_figure(args):
    from featkd import plots
    from featkd.repro.limited_data import load_results
    from featkd.repro.limited_data_report import comparison_groups

    result = load_results([args.result])[0]
    accuracies = result["accuracies"]
    tables = {"published" if baseline == "student" else "tuned": (title, baseline, names)
              for title, baseline, names in comparison_groups(list(accuracies))}
    if args.table not in tables:
        raise ValueError(f"{args.result} holds no {args.table} table, only: {', '.join(tables)} (--table)")
    title, baseline, names = tables[args.table]
    seeds = len(result["seeds"])
    return plots.paired_deltas({name: accuracies[name] for name in names}, baseline=baseline,
                               teacher=result["teacher_acc"],
                               title=args.title or f"{result['fraction']:.0%} of the training images, {title}: "
                                                   f"Δ vs {baseline}, mean ± 95% CI over {seeds} seeds")


def _attention_figure(args):
    import torch

    from featkd import checkpoint as ckpt
    from featkd import plots
    from featkd.checkpoint import model_from_checkpoint
    from featkd.data import DeviceLoader, load_dataset
    from featkd.models import default_distill_layers

    teacher, _ = model_from_checkpoint(ckpt.load_checkpoint(args.teacher), torch.device("cpu"), source=str(args.teacher))
    student_path, _, name = args.student.partition(":")
    student, _ = model_from_checkpoint(ckpt.load_checkpoint(student_path), torch.device("cpu"), name=name or None,
                                       source=student_path)
    test = load_dataset(args.data, args.root, "test", limit=args.count)
    x, _ = next(iter(DeviceLoader(test, args.count, shuffle=False, drop_last=False)))
    t_layers = args.teacher_layers or default_distill_layers(teacher)
    s_layers = args.student_layers or default_distill_layers(student)
    t_maps = plots.attention_maps(teacher, x, t_layers)
    s_maps = plots.attention_maps(student, x, s_layers)
    return plots.attention_grid(test.images.numpy(), t_maps, s_maps)
