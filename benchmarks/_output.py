"""What the benchmark scripts share: waiting for the device before reading a clock, and the --out file."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read before it would miss it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_markdown(out: Path, lines: list[str], script: str, argv: list[str] | None) -> None:
    """The printed ``lines``, then the command that made them, to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + f"\n\nCommand: `python benchmarks/{script} "
                   + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
