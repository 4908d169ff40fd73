"""``featkd show RUN_DIR``: how a run's numbers were made: its recipe, its provenance and its final metrics.

    featkd show runs/kd_at_nst
    featkd show runs/kernels/members/kernel=poly,seed=0

The recipe is the run's saved ``config.yaml`` as it was resolved (models, terms with their layers,
loss, weight and options, KD, the cross-entropy weight, optimiser, schedule, data; a sweep's base config
and grid, a strategy's own section); the provenance is ``environment.json`` (featkd's version and
commit, libraries, hardware); the final metrics are the last line of ``metrics.jsonl``. Any kind of run:
train, distill, a sweep and its members, DML, born-again (each generation's final metrics),
adversarial, the repro tables' runs.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from featkd.commands._common import reports_user_errors

# The recipe's parts in the order a reader follows them; the rest of the config comes after, as saved.
RECIPE_ORDER = ("model", "teacher", "student", "terms", "kd", "ce_weight", "optim", "schedule", "epochs", "seed",
                "data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a sweep member's, members/NAME)")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def inline(value: Any) -> str:
    """A config value on one line, as YAML flow style without its unset (null) keys:
    ``{loss: kd, weight: 0.9, options: {T: 4}}``."""
    import yaml

    text = yaml.safe_dump(_without_nulls(value), default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.strip().removesuffix("...").strip()  # a scalar's document ends with '...'


def _is_list_of_dicts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def recipe_lines(config: dict[str, Any], indent: str = "  ", order: tuple[str, ...] = RECIPE_ORDER) -> list[str]:
    """The config's set keys, the recipe's first, one per line; a list of mappings (terms, peers) one item per
    line, and a section that holds one (``dml:``) one key per line."""
    keys = [key for key in order if key in config] + [key for key in config if key not in order]
    keys = [key for key in keys if config[key] not in (None, [], {})]
    width = max(map(len, keys), default=0)
    lines = []
    for key in keys:
        value = config[key]
        if _is_list_of_dicts(value):
            lines.append(f"{indent}{key}")
            lines += [f"{indent}  - {inline(item)}" for item in value]
        elif isinstance(value, dict) and any(map(_is_list_of_dicts, value.values())):
            lines.append(f"{indent}{key}")
            lines += recipe_lines(value, indent + "  ", order=())
        else:
            lines.append(f"{indent}{key:<{width}}  {inline(value)}")
    return lines


def provenance_lines(environment: dict[str, Any] | None) -> list[str]:
    from featkd.provenance import kept_segments

    if environment is None:
        return ["  not recorded (the run has no environment.json)"]
    earlier = environment.get("earlier") or []
    shown = {key: value for key, value in environment.items() if key != "earlier"}
    width = max(map(len, shown))
    lines = [f"  {key:<{width}}  {shlex.join(value) if key == 'argv' else 'none' if value is None else value}"
             for key, value in shown.items()]
    kept = kept_segments(environment)
    for segment, first, last in kept[:-1]:
        if "not_recorded" in segment:
            lines.append(f"  earlier epochs: not recorded ({segment['not_recorded']})")
            continue
        threads = segment.get("torch_threads")
        lines.append(f"  epochs {first}-{last} ran earlier: featkd {segment.get('featkd')} at "
                     f"{segment.get('featkd_commit') or 'none'}{' (dirty)' if segment.get('featkd_dirty') else ''}, "
                     f"torch {segment.get('torch')}, {segment.get('cpu')}, {threads} torch thread{'s' * (threads != 1)}, "
                     f"gpu {segment.get('gpu') or 'none'}")
    dropped = len(earlier) + 1 - len(kept)
    if dropped:
        lines.append(f"  and {dropped} resume{'s' * (dropped != 1)} stopped before an epoch ended (nothing of "
                     f"{'them' if dropped != 1 else 'it'} kept; environment.json lists them under 'earlier')")
    return lines


def metrics_lines(row: dict[str, Any] | None) -> list[str]:
    if row is None:
        return ["  none yet (the run has not finished an epoch)"]
    width = max(map(len, row))
    return [f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
            for key, value in row.items()]


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from featkd.saved_runs import is_sweep_config, read_run, run_kind, run_sections

    run = read_run(args.run_dir)
    print(f"run {run.path}: {run_kind(run)}")
    if run.sweep is not None:
        print(f"its model is in {run.sweep}'s checkpoint: featkd eval --run-dir {run.sweep} --model {run.path.name}")
    if is_sweep_config(run.config):
        print("\nsweep grid (one member per combination)")
        print("\n".join(f"  {key}  {inline(values)}" for key, values in run.config["grid"].items()))
        if run.config.get("fused"):
            print("  its students trained as one batched computation (featkd sweep --fused)")
        print("\nrecipe (the base config, every member's but for the grid)")
        print("\n".join(recipe_lines(run_sections(run.config))))
    else:
        print("\nrecipe (config.yaml)")
        print("\n".join(recipe_lines(run.config)))
    print("\nprovenance (environment.json)")
    print("\n".join(provenance_lines(run.environment)))
    for generation in run.generations:
        print(f"\nfinal metrics of {generation.name} ({generation / 'metrics.jsonl'}, last line)")
        print("\n".join(metrics_lines(read_run(generation).final_metrics)))
    if not run.generations:
        print("\nfinal metrics (metrics.jsonl, last line)")
        print("\n".join(metrics_lines(run.final_metrics)))
    return 0
