"""Tables of the strategy experiments run by run.sh: final-epoch test top-1 per seed, and the mean.

    PYTHONPATH=. python paper_repro/strategies/summarize.py [runs/strategies]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def final(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def row(label: str, values: list[float]) -> str:
    per_seed = " / ".join(f"{v:.2f}" for v in values)
    mean = statistics.mean(values) if values else float("nan")
    return f"| {label} | {per_seed} | {mean:.2f} |"


def independent_ensemble(runs: list[Path]) -> float:
    """Top-1 of the averaged softmax of independently trained networks (the fair match for DML's ensemble)."""
    import torch

    from featkd import checkpoint as ckpt
    from featkd.checkpoint import model_from_checkpoint
    from featkd.runs import build_datasets
    import yaml

    from featkd.config import from_dict
    from featkd.data import DeviceLoader
    from featkd.engine import evaluate
    from featkd.models.ensemble import ProbabilityAverage

    saved = yaml.safe_load((runs[0] / ckpt.CONFIG_YAML).read_text())
    cfg = from_dict({k: v for k, v in saved.items() if k not in ("born_again", "dml", "adversarial")})
    _, test = build_datasets(cfg.data)
    loader = DeviceLoader(test, cfg.data.eval_batch_size, shuffle=False, augment=False, drop_last=False)
    models = [model_from_checkpoint(ckpt.load_checkpoint(run / ckpt.LAST), torch.device("cpu"))[0] for run in runs]
    return evaluate(ProbabilityAverage(models), loader)["acc1"]


def main(root: Path) -> None:
    seeds = sorted(int(p.name.split("_s")[1]) for p in root.glob("ban_s*") if (p / "gen0" / "metrics.jsonl").is_file())
    header = f"| run | top-1 per seed ({', '.join(map(str, seeds))}) | mean |\n|---|---|---|"

    def collect(pattern: str, key: str) -> list[float]:
        values = []
        for s in seeds:
            run = root / pattern.format(s=s)
            if (run / "metrics.jsonl").is_file():
                values.append(final(run)[key])
        return values

    if (root / "teacher_resnet20" / "metrics.jsonl").is_file():
        print(f"teacher ResNet-20 (seed 0): {final(root / 'teacher_resnet20')['model/acc1']:.2f}\n")
    baseline = collect("ban_s{s}/gen0", "student/acc1")  # ResNet-8 alone with cross-entropy, same budget
    print("\nDeep Mutual Learning (two ResNet-8 peers)\n" + header)
    print(row("baseline (ResNet-8 alone)", baseline))
    for key in ("peer0", "peer1", "ensemble"):
        print(row(f"DML {key}", collect("dml_s{s}", f"{key}/acc1")))
    baselines = [root / f"ban_s{s}" / "gen0" for s in seeds]
    if len(baselines) >= 2:
        print(f"| ensemble of the independent baselines (seeds {', '.join(map(str, seeds))}) | "
              f"{independent_ensemble(baselines):.2f} | |")
    print("\nBorn-Again Networks (ResNet-8; generation 0 is trained with cross-entropy)\n" + header)
    for g in range(3):
        label = "generation 0 (= baseline)" if g == 0 else f"generation {g}"
        print(row(label, collect(f"ban_s{{s}}/gen{g}", "student/acc1")))
    print(row("ensemble gen 0-1", collect("ban_s{s}/gen1", "ensemble_all/acc1")))
    print(row("BANE gen 1-2", collect("ban_s{s}/gen2", "bane/acc1")))
    print(row("ensemble gen 0-2", collect("ban_s{s}/gen2", "ensemble_all/acc1")))
    if collect("ban_ce_s{s}/gen2", "student/acc1"):
        print("\nBorn-Again Networks with the labels too (ce_weight=1)\n" + header)
        for g in range(3):
            label = "generation 0 (= baseline)" if g == 0 else f"generation {g}"
            print(row(label, collect(f"ban_ce_s{{s}}/gen{g}", "student/acc1")))
        print(row("BANE gen 1-2", collect("ban_ce_s{s}/gen2", "bane/acc1")))
        print(row("ensemble gen 0-2", collect("ban_ce_s{s}/gen2", "ensemble_all/acc1")))
    print("\nAdversarial KD (ResNet-20 teacher -> ResNet-8 student)\n" + header)
    print(row("baseline (ResNet-8 alone)", baseline))
    for name, pattern in (("adversarial (BCE) + L1", "adv_s{s}"), ("adversarial (LSGAN) + L1", "adv_lsgan_s{s}"),
                          ("adversarial (BCE) + L1 + CE", "adv_ce_s{s}")):
        values = collect(pattern, "student/acc1")
        if values:
            print(row(name, values))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/strategies"))
