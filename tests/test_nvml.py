"""batchfinder.nvml: GPU information from the NVIDIA driver, and a clean answer when there is no driver or GPU.

Most tests replace the ``pynvml`` module with a fake one, so they pass on any machine; the last one asks the real
driver and runs only where CUDA is present.
"""

from __future__ import annotations

import json
import os
import sys
import types
from typing import Any

import pytest
import torch

from batchfinder import nvml


class _NVMLError(Exception):
    pass


class _LibraryNotFound(_NVMLError):
    pass


class _DriverNotLoaded(_NVMLError):
    pass


class _NotSupported(_NVMLError):
    pass


def _fake_pynvml(*, init_error: Exception | None = None, gpus: int = 1, processes: Any = None) -> types.ModuleType:
    """A stand-in for the ``pynvml`` module with ``gpus`` GPUs of 80 GiB, 5 GiB of it used."""
    module = types.ModuleType("pynvml")
    module.NVMLError = _NVMLError
    module.NVMLError_LibraryNotFound = _LibraryNotFound
    module.NVMLError_DriverNotLoaded = _DriverNotLoaded
    calls: list[str] = []
    module.calls = calls

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def shutdown() -> None:
        calls.append("shutdown")

    def not_supported(*_: Any) -> Any:
        raise _NotSupported("Not Supported")

    module.nvmlInit = init
    module.nvmlShutdown = shutdown
    module.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    module.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
    module.nvmlSystemGetNVMLVersion = lambda: b"12.550.54.15"
    module.nvmlDeviceGetCount = lambda: gpus
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetName = lambda handle: f"NVIDIA Fake {handle[1]}"
    module.nvmlDeviceGetUUID = lambda handle: f"GPU-fake-{handle[1]}"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=80 * 2**30, used=5 * 2**30, free=75 * 2**30
    )
    default = [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=1 * 2**30),
        types.SimpleNamespace(pid=999_999_999, usedGpuMemory=3 * 2**30),
    ]
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: default if processes is None else processes
    module.nvmlDeviceGetGraphicsRunningProcesses = not_supported
    return module


def test_no_driver_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(init_error=_LibraryNotFound("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    report = nvml.query()
    assert not report.available and not report.has_gpu
    assert "NVML library" in report.reason
    text = nvml.format_report(report)
    assert "No NVIDIA GPU" in text and "driver" in text
    assert report.to_dict() == json.loads(json.dumps(report.to_dict()))


def test_driver_not_loaded_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=_DriverNotLoaded("Driver Not Loaded")))
    report = nvml.query()
    assert not report.available
    assert "not loaded" in report.reason


def test_missing_pynvml_module_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    report = nvml.query()
    assert not report.available
    assert "nvidia-ml-py" in report.reason


def test_driver_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(gpus=0))
    report = nvml.query()
    assert report.available and not report.has_gpu
    assert "No NVIDIA GPU" in nvml.format_report(report)


def test_gpu_details_versions_and_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    report = nvml.query()
    assert report.has_gpu and len(report.gpus) == 2
    assert report.driver_version == "550.54.15"
    assert report.cuda_driver_version == "12.4"
    assert report.nvml_version == "12.550.54.15"  # bytes from older bindings are decoded
    gpu = report.gpus[1]
    assert gpu.name == "NVIDIA Fake 1" and gpu.uuid == "GPU-fake-1" and gpu.index == 1
    assert (gpu.total_bytes, gpu.used_bytes, gpu.free_bytes) == (80 * 2**30, 5 * 2**30, 75 * 2**30)
    assert gpu.used_by_this_process == 2**30
    assert gpu.used_by_other_processes == 3 * 2**30
    data = json.loads(json.dumps(report.to_dict()))
    assert data["gpus"][0]["used_by_other_processes"] == 3 * 2**30
    text = nvml.format_report(report)
    assert "NVIDIA Fake 0" in text and "80.00 GiB total" in text and "by 1 other process" in text
    assert "CUDA 12.4" in text and "550.54.15" in text
    assert fake.calls == ["init", "shutdown"]  # NVML is shut down again


def test_unknown_process_memory_is_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    processes = [types.SimpleNamespace(pid=999_999_999, usedGpuMemory=None)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(processes=processes))
    gpu = nvml.query().gpus[0]
    assert gpu.used_by_other_processes is None
    assert gpu.used_by_this_process == 0
    assert "unknown by 1 other process" in nvml.format_report(nvml.query())


def test_gpus_command_prints_the_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from batchfinder import cli

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    assert cli.main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: NVIDIA Fake 0" in out and "550.54.15" in out
    assert cli.main(["gpus", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["available"] and data["gpus"][0]["total_bytes"] == 80 * 2**30


def test_gpus_command_without_driver_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from batchfinder import cli

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=_LibraryNotFound("not found")))
    assert cli.main(["gpus"]) == 0
    assert "No NVIDIA GPU or driver found" in capsys.readouterr().out


def test_real_query_never_raises() -> None:
    report = nvml.query()  # whatever this machine has
    assert isinstance(report, nvml.NvmlReport)
    assert report.available or report.reason
    json.dumps(report.to_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_matches_torch() -> None:
    report = nvml.query()
    assert report.has_gpu, report.reason
    assert report.driver_version and report.cuda_driver_version
    names = {gpu.name for gpu in report.gpus}
    assert torch.cuda.get_device_name(0) in names
    total = torch.cuda.get_device_properties(0).total_memory
    assert any(abs(gpu.total_bytes - total) <= 0.05 * gpu.total_bytes for gpu in report.gpus)
    assert all(0 <= gpu.used_bytes <= gpu.total_bytes for gpu in report.gpus)
