"""One definition of what "auto" device and dtype mean, shared by every model-running library."""

import subprocess
import sys

import torch

from storage import devices


def test_resolve_device_and_dtype_are_defined_once_and_shared():
    from captioning import captioner
    from pixart.features import encoders

    for module in (captioner, encoders):  # the trainer, sampling and benchmarks import them from these two
        assert module.resolve_device is devices.resolve_device
        assert module.resolve_dtype is devices.resolve_dtype
    cpu = devices.resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert devices.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_dtype("auto", cpu) is torch.float32
    assert devices.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert devices.resolve_dtype("float16", cpu) is torch.float16


def test_storage_devices_imports_without_torch():
    code = "import sys, storage.devices; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
