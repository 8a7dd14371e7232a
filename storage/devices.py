"""Which device and dtype "auto" means, in one place for every model-running library (captioning, pixart).

Torch-free: callers pass whether CUDA is available and turn the names into torch objects.
"""


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
