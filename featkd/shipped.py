"""The teacher checkpoint that ships with featkd, and how it was made.

``featkd demo`` and ``featkd repro limited-data`` use a WRN-16-2 trained on all 60 000 Fashion-MNIST
training images. Training it takes longer than the demo may, so the checkpoint is in the repository;
both commands check its sha256 and its test accuracy before using it, and ``--retrain-teacher``
makes it again with :data:`TEACHER`'s command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ShippedTeacher:
    path: Path
    sha256: str
    test_acc: float  # % on the whole Fashion-MNIST test split, as recorded when it was made
    config: str  # the shipped config it was trained with
    overrides: tuple[str, ...]


TEACHER = ShippedTeacher(
    path=REPO_ROOT / "paper_repro" / "teachers" / "fmnist_wrn16_2.pt",
    sha256="d3d35ec36590ad76405941f2cecb6799c390bfe66008c5f963e6a6d4b6269ad5",
    test_acc=90.20,
    config="fmnist_teacher_wrn16_2",
    overrides=("epochs=3",),
)


def export_teacher(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the model record, weights, config and history of a ``featkd train`` checkpoint to ``out``
    (without the optimiser state and RNG states that only resuming needs); refuse to overwrite."""
    from featkd import checkpoint as ckpt

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"not overwriting {out}")
    state = ckpt.load_checkpoint(checkpoint)
    ckpt.save_checkpoint(out, {key: state[key] for key in ("epoch", "models", "config", "history") if key in state})
    return out
