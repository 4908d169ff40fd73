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
    sha256="62423383455b37aa2c71a5717ce12d35b5d774c0e60eb3445da04a0d3ae7e0f6",
    test_acc=94.95,
    config="fmnist_teacher_wrn16_2",
    overrides=(),  # the config's full schedule: 30 epochs, cosine; its last epoch (2026-12-03, Intel Xeon, 2 threads
    # but epochs 4-6 at 1: the run was resumed twice with --resume, which continues exactly where it stopped)
)
# The teacher featkd shipped before (3 epochs, 90.20%): the earlier limited-data results in paper_repro/ used it.
EARLIER_TEACHER_PATH = REPO_ROOT / "paper_repro" / "teachers" / "fmnist_wrn16_2_3ep.pt"


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
