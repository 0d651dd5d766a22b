"""batchfinder.devices.nvml: GPU information from the NVIDIA driver, and a clean answer when there is no driver or GPU.

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

from batchfinder.devices import nvml


class _NVMLError(Exception):
    pass


class _LibraryNotFound(_NVMLError):
    pass


class _DriverNotLoaded(_NVMLError):
    pass


class _NotSupported(_NVMLError):
    pass


def _fake_pynvml(
    *,
    init_error: Exception | None = None,
    gpus: int = 1,
    processes: Any = None,
    names: list[str] | None = None,
    uuids: list[str] | None = None,
) -> types.ModuleType:
    """A stand-in for the ``pynvml`` module with ``gpus`` GPUs of 80 GiB, 5 GiB of it used, in PCI order.

    ``processes`` is one list for every GPU or a dict of lists by NVML index; ``names`` and ``uuids`` replace the
    default ``NVIDIA Fake <i>`` and ``GPU-fake-<i>``.
    """
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
    module.nvmlDeviceGetName = lambda handle: names[handle[1]] if names else f"NVIDIA Fake {handle[1]}"
    module.nvmlDeviceGetUUID = lambda handle: uuids[handle[1]] if uuids else f"GPU-fake-{handle[1]}"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=80 * 2**30, used=5 * 2**30, free=75 * 2**30
    )
    default = [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=1 * 2**30),
        types.SimpleNamespace(pid=999_999_999, usedGpuMemory=3 * 2**30),
    ]

    def compute_processes(handle: Any) -> Any:
        if isinstance(processes, dict):
            return processes.get(handle[1], [])
        return default if processes is None else processes

    module.nvmlDeviceGetComputeRunningProcesses = compute_processes
    module.nvmlDeviceGetGraphicsRunningProcesses = not_supported
    return module


@pytest.fixture(autouse=True)
def _hermetic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake-driver tests see no CUDA_VISIBLE_DEVICES and no torch CUDA state unless they set them (on a GPU machine
    torch may have initialised CUDA in an earlier test); the ``test_real_*`` tests see the machine as it is."""
    if request.node.name.startswith("test_real_"):
        return
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(nvml, "_torch_view", lambda: None, raising=False)


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


# -- which NVML GPU is cuda:N, and which process is this one -------------------------------------------------------
UUID_A = "GPU-aaaa1111-0000-4000-8000-000000000000"
UUID_B = "GPU-bbbb2222-0000-4000-8000-000000000000"
GiB = 2**30


def _two_gpus(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> types.ModuleType:
    """Two GPUs of one model in PCI order (NVML index 0 = UUID_A, 1 = UUID_B) installed as ``pynvml``."""
    kwargs.setdefault("uuids", [UUID_A, UUID_B])
    kwargs.setdefault("names", ["NVIDIA H100 80GB HBM3"] * 2)
    fake = _fake_pynvml(gpus=2, **kwargs)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def _torch_sees(monkeypatch: pytest.MonkeyPatch, view: nvml.TorchView) -> None:
    monkeypatch.setattr(nvml, "_torch_view", lambda: view, raising=False)


def test_cuda_visible_devices_index_maps_cuda0_to_the_second_pci_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    report = nvml.query()
    assert [g.index for g in report.gpus] == [0, 1]  # NVML's order is kept
    cuda0 = report.gpu_for_device("cuda:0")
    assert cuda0 is not None and cuda0.index == 1 and cuda0.uuid == UUID_B
    assert report.gpu_for_device("cuda") is cuda0 and report.gpu_for_device(0) is cuda0
    assert report.gpu_for_device(torch.device("cuda", 0)) is cuda0
    assert report.gpu_for_device("cuda:1") is None  # only one GPU is visible
    assert report.gpus[0].cuda_index is None
    assert report.visible_gpus == [cuda0]
    text = nvml.format_report(report)
    assert "GPU 1: NVIDIA H100 80GB HBM3 (cuda:0)" in text
    assert "GPU 0: NVIDIA H100 80GB HBM3 (no CUDA index here)" in text
    assert "CUDA_VISIBLE_DEVICES=1" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert [g["cuda_index"] for g in data["gpus"]] == [None, 0] and data["cuda_mapping"] == "CUDA_VISIBLE_DEVICES=1"


def test_cuda_visible_devices_order_is_cudas_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    report = nvml.query()
    assert [(g.index, g.cuda_index) for g in report.gpus] == [(0, 1), (1, 0)]
    assert [g.index for g in report.visible_gpus] == [1, 0]


def test_unset_cuda_visible_devices_is_pci_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    report = nvml.query()
    assert [g.cuda_index for g in report.gpus] == [0, 1]
    assert "PCI order" in (report.cuda_mapping or "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUID_B, {1: 0}),  # a full UUID
        ("GPU-bbbb", {1: 0}),  # a unique prefix
        (f"{UUID_B},{UUID_A}", {1: 0, 0: 1}),
        ("GPU-bbbb,0", {1: 0, 0: 1}),  # UUIDs and indices mixed
        ("gpu-BBBB2222", {1: 0}),  # case does not matter
        ("GPU-", {}),  # an ambiguous prefix names no GPU ...
        ("0,GPU-,1", {0: 0}),  # ... and, as for CUDA, hides every entry after it
        ("0,7,1", {0: 0}),  # so does an index out of range
        ("0,0", {0: 0}),  # and a repeated GPU
        ("", {}),  # nothing visible
        ("-1", {}),
        (" 1 , 0 ", {1: 0, 0: 1}),  # spaces around entries
    ],
)
def test_cuda_visible_devices_entries(value: str, expected: dict[int, int]) -> None:
    gpus = [
        nvml.GpuInfo(0, "NVIDIA Fake", UUID_A, 80 * GiB, 0, 80 * GiB),
        nvml.GpuInfo(1, "NVIDIA Fake", UUID_B, 80 * GiB, 0, 80 * GiB),
    ]
    mapping, how = nvml.map_cuda_indices(gpus, environ={"CUDA_VISIBLE_DEVICES": value})
    assert mapping == expected
    assert how.startswith(f"CUDA_VISIBLE_DEVICES={value}")


def test_mig_entries_are_not_mapped() -> None:
    gpus = [nvml.GpuInfo(0, "NVIDIA A100", UUID_A, 80 * GiB, 0, 80 * GiB)]
    mapping, how = nvml.map_cuda_indices(gpus, environ={"CUDA_VISIBLE_DEVICES": "MIG-1234abcd-0000"})
    assert mapping == {} and "MIG" in how


def test_indices_on_mixed_gpus_are_not_guessed_without_pci_bus_order() -> None:
    gpus = [
        nvml.GpuInfo(0, "NVIDIA RTX A4000", UUID_A, 16 * GiB, 0, 16 * GiB),
        nvml.GpuInfo(1, "NVIDIA H100 80GB HBM3", UUID_B, 80 * GiB, 0, 80 * GiB),
    ]
    # CUDA's default FASTEST_FIRST order may put the H100 first: an index could mean either GPU
    mapping, how = nvml.map_cuda_indices(gpus, environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert mapping == {} and "CUDA_DEVICE_ORDER" in how
    mapping, how = nvml.map_cuda_indices(gpus, environ={})
    assert mapping == {} and "not mapped" in how
    # UUIDs are unambiguous whatever the order, and PCI_BUS_ID makes indices PCI order
    assert nvml.map_cuda_indices(gpus, environ={"CUDA_VISIBLE_DEVICES": UUID_B})[0] == {1: 0}
    ordered = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert nvml.map_cuda_indices(gpus, environ=ordered)[0] == {1: 0}


def test_torch_uuids_decide_the_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's UUIDs have no ``GPU-`` prefix; once CUDA is initialised they win over the environment (which may
    have changed since)."""
    _two_gpus(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # stale: this process's CUDA actually sees GPU B only
    _torch_sees(monkeypatch, nvml.TorchView(uuids=[UUID_B[4:].upper()], reserved_bytes=[0], contexts=[False]))
    report = nvml.query()
    assert [g.cuda_index for g in report.gpus] == [None, 0]
    assert report.cuda_mapping == "by UUID, from torch"
    assert nvml.normalize_uuid(UUID_B) == nvml.normalize_uuid(UUID_B[4:].upper()) == UUID_B[4:]


def test_torch_uuids_of_mig_instances_match_nothing() -> None:
    gpus = [nvml.GpuInfo(0, "NVIDIA A100", UUID_A, 80 * GiB, 0, 80 * GiB)]
    view = nvml.TorchView(uuids=["MIG-1234abcd-0000"], reserved_bytes=[0])
    mapping, how = nvml.map_cuda_indices(gpus, environ={}, torch_view=view)
    assert mapping == {} and "match no NVML GPU" in how


def test_torch_without_uuids_falls_back_to_the_environment() -> None:
    gpus = [
        nvml.GpuInfo(0, "NVIDIA Fake", UUID_A, 80 * GiB, 0, 80 * GiB),
        nvml.GpuInfo(1, "NVIDIA Fake", UUID_B, 80 * GiB, 0, 80 * GiB),
    ]
    view = nvml.TorchView(uuids=[None], reserved_bytes=[0])  # a torch without props.uuid
    assert nvml.map_cuda_indices(gpus, environ={"CUDA_VISIBLE_DEVICES": "1"}, torch_view=view)[0] == {1: 0}


def test_a_pid_nvml_does_not_list_is_not_charged_with_others_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container NVML lists host PIDs: this process (using cuda:0) appears under another number."""
    host_pids = [types.SimpleNamespace(pid=999_999_998, usedGpuMemory=3 * GiB)]
    _two_gpus(monkeypatch, processes={1: host_pids})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    _torch_sees(monkeypatch, nvml.TorchView(uuids=[UUID_B[4:]], reserved_bytes=[2 * GiB], contexts=[True]))
    report = nvml.query()
    gpu = report.gpu_for_device("cuda:0")
    assert gpu is not None and gpu.index == 1
    assert gpu.this_process == "unlisted" and gpu.own_pid is None
    assert gpu.used_by_this_process is None  # not 0: it does hold memory
    assert gpu.used_by_other_processes is None  # not 3 GiB: that entry may be this process
    assert gpu.torch_reserved_bytes == 2 * GiB
    line = next(line for line in nvml.format_report(report).splitlines() if line.startswith("GPU 1:"))
    assert "this process: unknown" in line and "2.00 GiB reserved" in line and "3.00 GiB by 1 listed process" in line
    assert "0 B by this process" not in line
    # the GPU this process does not use: nothing is its own
    other = report.gpus[0]
    assert other.this_process == "not using" and other.used_by_this_process == 0


def test_a_listed_pid_holding_less_than_torch_is_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same number in another PID namespace: the entry cannot be this process, which holds 2 GiB in torch."""
    entries = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=100 * 2**20)]
    _two_gpus(monkeypatch, processes={0: entries})
    _torch_sees(monkeypatch, nvml.TorchView(uuids=[UUID_A[4:]], reserved_bytes=[2 * GiB], contexts=[True]))
    gpu = nvml.query().gpus[0]
    assert gpu.cuda_index == 0 and gpu.this_process == "unlisted"
    assert gpu.used_by_this_process is None and gpu.used_by_other_processes is None
    assert [p.pid for p in gpu.other_processes] == [os.getpid()]


def test_a_listed_pid_holding_what_torch_holds_is_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GiB),
        types.SimpleNamespace(pid=999_999_998, usedGpuMemory=1 * GiB),
    ]
    _two_gpus(monkeypatch, processes={0: entries})
    view = nvml.TorchView(uuids=[UUID_A[4:], UUID_B[4:]], reserved_bytes=[2 * GiB, 0], contexts=[True, False])
    _torch_sees(monkeypatch, view)
    report = nvml.query()
    gpu = report.gpu_for_device("cuda:0")
    assert gpu is not None and gpu.this_process == "listed" and gpu.own_pid == os.getpid()
    assert gpu.used_by_this_process == 3 * GiB and gpu.used_by_other_processes == GiB
    assert report.gpus[1].this_process == "not using"  # visible, but no context and nothing reserved there
    text = nvml.format_report(report)
    assert "3.00 GiB by this process, torch has 2.00 GiB reserved, 1.00 GiB by 1 other process" in text


def test_without_torch_cuda_an_unlisted_pid_uses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that never initialised CUDA holds no GPU memory: every listed process is another one."""
    _two_gpus(monkeypatch, processes=[types.SimpleNamespace(pid=999_999_998, usedGpuMemory=3 * GiB)])
    gpu = nvml.query().gpus[0]
    assert gpu.this_process == "not using"
    assert (gpu.used_by_this_process, gpu.used_by_other_processes) == (0, 3 * GiB)


def test_a_hand_built_gpu_claims_nothing() -> None:
    gpu = nvml.GpuInfo(0, "NVIDIA Fake", UUID_A, 80 * GiB, 4 * GiB, 76 * GiB, [nvml.GpuProcess(os.getpid(), GiB)])
    assert gpu.this_process == "unknown"
    assert gpu.used_by_this_process is None and gpu.used_by_other_processes is None


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "mps:0"])
def test_gpu_for_device_refuses_other_devices(device: str) -> None:
    with pytest.raises(ValueError, match="not a CUDA device"):
        nvml.NvmlReport(True).gpu_for_device(device)


def test_real_query_does_not_initialise_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA was already initialised in this process")
    nvml.query()
    assert not torch.cuda.is_initialized()


def test_real_query_never_raises() -> None:
    report = nvml.query()  # whatever this machine has
    assert isinstance(report, nvml.NvmlReport)
    assert report.available or report.reason
    json.dumps(report.to_dict())


def _skip_on_rocm() -> None:
    if torch.version.hip is not None:
        pytest.skip("ROCm has no NVML (its GPUs are AMD's): nothing to compare")


def _is_mig(index: int = 0) -> bool:
    """True when ``cuda:index`` is a MIG instance: torch then describes the instance, NVML the parent GPU."""
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    return " MIG " in f" {torch.cuda.get_device_name(index)} " or uuid.upper().startswith("MIG-") or any(
        entry.strip().upper().startswith("MIG-") for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_matches_torch() -> None:
    _skip_on_rocm()
    report = nvml.query()
    assert report.has_gpu, report.reason
    assert report.driver_version and report.cuda_driver_version
    names = {gpu.name for gpu in report.gpus}
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    if _is_mig(0):
        # "NVIDIA A100-SXM4-40GB MIG 3g.20gb" is a slice of the NVML GPU "NVIDIA A100-SXM4-40GB"
        parents = [gpu for gpu in report.gpus if name.startswith(gpu.name)]
        assert parents, (name, names)
        assert any(total <= gpu.total_bytes for gpu in parents)
    else:
        assert name in names
        assert any(abs(gpu.total_bytes - total) <= 0.05 * gpu.total_bytes for gpu in report.gpus)
    assert all(0 <= gpu.used_bytes <= gpu.total_bytes for gpu in report.gpus)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_of_cuda0_is_found_by_uuid_with_this_process() -> None:
    _skip_on_rocm()
    if _is_mig(torch.cuda.current_device()):
        pytest.skip("a MIG instance: NVML's per-GPU figures describe the parent GPU, not this device")
    held = torch.ones(64 * 2**20, device="cuda")  # 256 MiB, so this process holds memory on the current GPU
    torch.cuda.synchronize()
    index = torch.cuda.current_device()
    report = nvml.query()
    gpu = report.gpu_for_device(index)
    assert gpu is not None, report.cuda_mapping
    assert gpu.name == torch.cuda.get_device_name(index)
    props = torch.cuda.get_device_properties(index)
    if getattr(props, "uuid", None) is not None:
        assert report.cuda_mapping == "by UUID, from torch"
        assert nvml.normalize_uuid(gpu.uuid) == nvml.normalize_uuid(str(props.uuid))
    assert gpu.torch_reserved_bytes == torch.cuda.memory_reserved(index) > 0
    assert gpu.this_process in ("listed", "unlisted")  # "unlisted" inside a container with its own PID namespace
    if gpu.this_process == "listed" and gpu.used_by_this_process is not None:
        assert gpu.used_by_this_process >= torch.cuda.memory_reserved(index)
    del held
