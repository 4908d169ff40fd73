"""``featkd sweep``: many student configurations against one teacher, its forward computed once per batch.

    featkd sweep --config fmnist_distill_kd_at_nst --run-dir runs/kernels \\
        teacher.checkpoint=runs/fmnist_teacher_wrn16_2/last.pt terms='[{teacher: group3, loss: nst, weight: 50}]' \\
        --grid terms.0.options.kernel=linear,poly,gaussian --grid terms.0.weight=10,50 --grid seed=0,1
    featkd sweep --run-dir runs/kernels --resume

Each ``--grid key=v1,v2,...`` is a dotted config key and its values (parsed as YAML); the members are
the product of all grids. What a shared teacher forward forces the members to share — data, epochs,
teacher — must not vary across the grid. A member's ``seed`` sets its student's initialisation and
its random stream; the batches come from the base config's ``seed``, so the member whose seed equals
the base seed reproduces ``featkd distill`` with the same config exactly.

Writes one run directory (``metrics.jsonl`` with a ``<member>/acc1`` column per member, checkpoints to
resume from) and, when done, ``members/<name>/`` per member for ``featkd plot``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

SHARED_KEYS = ("data", "epochs", "teacher", "device", "amp", "channels_last")


def _grid_arg(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected key=value1,value2,... e.g. kd.options.T=2,4,8")
    return key.strip(), [yaml.safe_load(v) for v in values.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="the base distill config (a path or a shipped config name)")
    parser.add_argument("--run-dir", metavar="DIR", required=True, help="the sweep's run directory (must be new unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --run-dir (its saved config and grid)")
    parser.add_argument("--grid", type=_grid_arg, action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and the values to sweep; repeat for a product of grids")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")


def _member_configs(base: dict, overrides: list[str], grid: dict[str, list]):
    from featkd import sweep
    from featkd.config import ConfigError, load_config

    base_cfg = load_config(None, overrides, base=base)
    members = []
    for point in sweep.expand_grid(grid) if grid else [{}]:
        point_overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                           for k, v in point.items()]
        cfg = load_config(None, overrides + point_overrides, base=base)
        for key in SHARED_KEYS:
            if getattr(cfg, key) != getattr(base_cfg, key):
                raise ConfigError(f"the grid changes {key!r} (member {sweep.member_name(point)}); a sweep shares one "
                                  f"teacher forward, so {', '.join(SHARED_KEYS)} must be the same for every member")
        members.append((sweep.member_name(point), cfg))
    return base_cfg, members


def run(args: argparse.Namespace) -> int:
    from featkd.commands.train import reports_user_errors

    return reports_user_errors(_run)(args)


def _run(args: argparse.Namespace) -> int:
    from featkd import checkpoint as ckpt
    from featkd import sweep
    from featkd.commands.distill import build_distiller, model_from_checkpoint
    from featkd.commands.train import build_loaders, build_model, build_optimization, model_record, start
    from featkd.config import ConfigError, read_yaml, to_dict
    from featkd.engine import Precision, fit, seed_everything

    run_dir = Path(args.run_dir)
    if args.resume:
        saved = run_dir / ckpt.CONFIG_YAML
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; is {run_dir} a featkd sweep directory?")
        stored = yaml.safe_load(saved.read_text())
        base, grid = stored["base"], stored["grid"]
        overrides = list(args.overrides)
    else:
        if not args.config:
            raise ConfigError("featkd sweep needs --config (the base distill config) unless --resume")
        base, grid, overrides = read_yaml(args.config), {}, list(args.overrides)
        for key, values in args.grid:
            grid[key] = values
    base_cfg, members_cfg = _member_configs(base, overrides, grid)
    if base_cfg.teacher is None or not base_cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is empty: give the last.pt of a 'featkd train' run")

    device = start(base_cfg)
    train_loader, test_loader = build_loaders(base_cfg, device)
    info = train_loader.info
    teacher_state = ckpt.load_checkpoint(base_cfg.teacher.checkpoint)
    teacher, _ = model_from_checkpoint(teacher_state, device, source=base_cfg.teacher.checkpoint)
    example_x, _ = next(iter(train_loader))
    shared = sweep.SharedTeacherOutputs()
    members, model_info = [], {}
    for name, cfg in members_cfg:
        seed_everything(cfg.seed, cfg.deterministic)
        # featkd distill builds the teacher between seeding and building the student, so the student's
        # initial weights depend on the random numbers the teacher's construction drew; draw them too
        # (a throwaway CPU copy) so that a member starts exactly where that run starts.
        model_from_checkpoint(teacher_state, torch.device("cpu"))
        student = build_model(cfg.student.name, cfg.student.options, info, device, cfg.channels_last)
        distiller = build_distiller(cfg, teacher, student).setup(example_x[:2])
        optimizer, scheduler = build_optimization(cfg, distiller.trainable_parameters())
        members.append(sweep.make_member(name, distiller, optimizer, scheduler, shared=shared, config=to_dict(cfg),
                                         precision=Precision(cfg.amp, device), grad_clip=cfg.grad_clip,
                                         steps_per_epoch=len(train_loader)))
        model_info[name] = model_record(cfg.student.name, cfg.student.options, info)
    method = sweep.SweepMethod(teacher, members, shared)
    print(f"sweep of {len(members)} members against {base_cfg.teacher.checkpoint}: {', '.join(m.name for m in members)}")
    try:
        history = fit(method, train_loader, test_loader, run_dir, base_cfg.epochs, resume=args.resume,
                      config={"base": base, "overrides": overrides, "grid": grid}, model_info=model_info,
                      device=device, log=print)
    finally:
        method.close()
    sweep.write_member_runs(run_dir, members, history)
    print("\n| member | test acc1 % (last epoch) |\n|---|---|")
    for member in members:
        print(f"| {member.name} | {history[-1][f'{member.name}/acc1']:.2f} |")
    print(f"\nfinished: {run_dir} (one run directory per member under {run_dir / sweep.MEMBERS_DIR})")
    return 0

