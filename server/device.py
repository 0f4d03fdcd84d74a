"""Which device and dtype a job runs on: the one place that looks for CUDA and Apple's MPS."""

from __future__ import annotations

import torch


def detect_device() -> str:
    """What "auto" means on this machine: CUDA, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str) -> torch.device:
    """A job's device setting as a torch device ("auto": `detect_device()`)."""
    return torch.device(detect_device() if name == "auto" else name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The prior's dtype: fp16 on CUDA when automatic; the geometry always stays fp32."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
