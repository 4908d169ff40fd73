"""Mixed precision shared by every Method: autocast for the forward, gradient scaling for fp16."""

from __future__ import annotations

import torch


class Precision:
    """Autocast and (for fp16) gradient scaling, shared by every Method.

    ``amp`` is ``None`` (full precision), ``"bf16"`` or ``"fp16"``. fp16 (autocast with gradient scaling)
    needs a CUDA device: elsewhere it is refused, rather than run in fp32 while the run's config records
    fp16; bf16 autocast runs on the CPU too.
    """

    def __init__(self, amp: str | None = None, device: str | torch.device = "cpu"):
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be one of None, 'bf16', 'fp16'; got {amp!r}")
        self.amp = amp
        self.device_type = torch.device(device).type
        if amp == "fp16" and self.device_type != "cuda":
            raise ValueError(f"amp=fp16 needs a CUDA device, and this run is on the {self.device_type}: set amp=bf16 "
                             "or amp=null there")
        self.enabled = amp is not None
        self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")

    def autocast(self):
        """Context manager for the forward pass (and the loss computation)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = None,
    ) -> None:
        """``zero_grad``, backward (scaled under fp16), optional grad-norm clipping, optimiser step."""
        optimizer.zero_grad(set_to_none=True)
        self.scale(loss).backward()
        self.step(optimizer, grad_clip)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on: scaled under fp16, as it is otherwise."""
        return self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None = None) -> None:
        """After the backward of :meth:`scale`'s loss: optional grad-norm clipping, then the optimiser step."""
        if grad_clip is not None and not grad_clip > 0:  # clip_grad_norm_ flips the gradient for a negative norm
            raise ValueError(f"grad_clip must be > 0 (a gradient-norm bound), got {grad_clip}")
        if grad_clip is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
