"""Which device and dtype "auto" means, in one place for every model-running library (captioning, pixart).

`device_name` and `dtype_name` are torch-free (callers pass whether CUDA is available); `resolve_device` and
`resolve_dtype` turn them into torch objects, importing torch only when called, so this module stays torch-free to
import. Every library that runs a model (captioning, pixart features, the trainer, `pixart sample`) uses these two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def device_name(device: str, cuda_available: bool) -> str:
    """"auto" -> "cuda" when available, else "cpu"; any other name as given."""
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    return device


def dtype_name(dtype: str, device_type: str) -> str:
    """"auto" -> bfloat16 on GPU, float32 on CPU (fp16/bf16 matmuls are slow or missing on CPUs)."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


def resolve_device(device: str) -> torch.device:
    """`device_name` as a torch.device, asking torch whether CUDA is available."""
    import torch

    return torch.device(device_name(device, torch.cuda.is_available()))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`dtype_name` for `device` as a torch.dtype."""
    import torch

    return getattr(torch, dtype_name(dtype, device.type))
