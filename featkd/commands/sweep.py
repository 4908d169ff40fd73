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

``--fused`` trains the members' students as one batched computation (:mod:`featkd.fused`; one student
architecture, no dropout): on a GPU several times the throughput, each member equal to its unfused run
to float tolerance. A resumed sweep keeps the way it was trained.

Writes one run directory (``metrics.jsonl`` with a ``<member>/acc1`` column per member, checkpoints to
resume from) and, when done, ``members/<name>/`` per member for ``featkd plot``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from featkd.commands._common import reports_user_errors
from featkd.config import ConfigError, describe_yaml_error, load_config, read_yaml, to_dict
from featkd.teachers import check_teacher_fits


def _grid_arg(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected key=value1,value2,... e.g. kd.options.T=2,4,8")
    try:
        return key.strip(), [yaml.safe_load(v) for v in values.split(",")]
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: a value is not valid YAML ({describe_yaml_error(error)}); "
                                         "values are separated by commas and cannot contain any") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="the base distill config (a path or a shipped config name)")
    parser.add_argument("--run-dir", metavar="DIR", required=True, help="the sweep's run directory (must be new unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --run-dir (its saved config and grid)")
    parser.add_argument("--grid", type=_grid_arg, action="append", default=[], metavar="KEY=V1,V2",
                        help="a config key and the values to sweep; repeat for a product of grids")
    parser.add_argument("--fused", action="store_true",
                        help="train the students as one batched computation (one student architecture, no dropout)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd import checkpoint as ckpt
    from featkd import runs, sweep
    from featkd.fused import FusedSweepMethod

    run_dir = Path(args.run_dir)
    if args.resume:
        saved = run_dir / ckpt.CONFIG_YAML
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist; is {run_dir} a featkd sweep directory?")
        if args.config or args.grid:
            raise ConfigError("with --resume the sweep's base config and grid are those in its config.yaml; drop "
                              "--config and --grid")
        stored = yaml.safe_load(saved.read_text())
        base, grid, overrides = stored["base"], stored["grid"], stored["overrides"]
        fused = stored.get("fused", False)
        if args.fused and not fused:
            raise ConfigError(f"{run_dir} was trained unfused; a resumed sweep keeps its way of training: drop --fused")
        runs.apply_resume_overrides(to_dict(load_config(None, overrides, base=base)), args.overrides, run_dir)
    else:
        if not args.config:
            raise ConfigError("featkd sweep needs --config (the base distill config) unless --resume")
        base, grid, overrides, fused = read_yaml(args.config), dict(args.grid), [], args.fused
    overrides += args.overrides
    base_cfg, member_cfgs = sweep.member_configs(base, overrides, grid)
    if base_cfg.teacher is None or not base_cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint is empty: give the last.pt of a 'featkd train' run")

    with runs.start_run(base_cfg, "sweep", "", run_dir, args.resume,  # --run-dir is required: no default name
                        {"base": base, "overrides": overrides, "grid": grid, "fused": fused}) as run:
        teacher_state = ckpt.load_checkpoint(base_cfg.teacher.checkpoint)
        teacher, record = ckpt.model_from_checkpoint(teacher_state, run.device, source=base_cfg.teacher.checkpoint)
        check_teacher_fits(record, run.info, base_cfg.teacher.checkpoint)
        method_class = FusedSweepMethod if fused else sweep.SweepMethod
        method, model_info = sweep.build_sweep(member_cfgs, teacher, teacher_state, run, method_class)
        members = method.members
        print(f"{'fused ' if fused else ''}sweep of {len(members)} members against {base_cfg.teacher.checkpoint}: "
              f"{', '.join(m.name for m in members)}")
        try:
            history = runs.fit_run(run, method, model_info)
        finally:
            method.close()
        sweep.write_member_runs(run_dir, members, history)
    print("\n| member | test acc1 % (last epoch) |\n|---|---|")
    for member in members:
        print(f"| {member.name} | {history[-1][f'{member.name}/acc1']:.2f} |")
    print(f"\nfinished: {run_dir} (one run directory per member under {run_dir / sweep.MEMBERS_DIR})")
    return 0
