"""benchmarks/gpu_check.py: the five-minute GPU check.

Without a GPU: it prints one line, exits 2 and writes nothing; the report is built from made-up figures; pytest's
output is parsed; the training step it measures is the one the estimator traces (checked on a simulated GPU); the
searches and the whole run work with only the CUDA parts replaced. With a GPU (``-m cuda``): one model measured and
one search run for real (never the pytest phase, which would run these tests again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level package of the repository, not of the library

import batchfinder as bf  # noqa: E402
from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check import MemoryCheck, PytestRun, SearchCheck  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


def _results_snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.iterdir()} if RESULTS.exists() else {}


# -- without a GPU ----------------------------------------------------------------------------------------------------
def test_without_a_gpu_it_prints_one_line_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    before = _results_snapshot()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}  # no GPU, also on a GPU machine
    for extra in ([], ["--out", str(tmp_path / "out")]):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout.splitlines() == [gpu_check.NO_GPU_MESSAGE]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    assert _results_snapshot() == before


def test_main_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == gpu_check.NO_GPU_MESSAGE + "\n" and captured.err == ""
    assert not (tmp_path / "out").exists()


# -- pure helpers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "counts"),
    [
        ("..s\n3 passed, 1 skipped, 320 deselected in 12.31s\n", {"passed": 3, "skipped": 1, "deselected": 320}),
        (
            "===== 1 failed, 4 passed, 2 skipped, 300 deselected, 1 warning, 1 error in 3.20s =====",
            {"failed": 1, "passed": 4, "skipped": 2, "deselected": 300, "warnings": 1, "errors": 1},
        ),
        ("4 passed, 2 errors in 1.0s", {"passed": 4, "errors": 2}),
        ("323 deselected in 2.20s", {"deselected": 323}),
        ("no tests ran in 0.01s", {}),
        ("ImportError while loading conftest", {}),
    ],
)
def test_pytest_counts(output: str, counts: dict[str, int]) -> None:
    assert gpu_check.parse_pytest_output(output)[0] == counts


def test_pytest_failures_and_summary() -> None:
    output = textwrap.dedent(
        """\
        .F.E
        =========================== short test summary info ============================
        SKIPPED [1] tests/test_nvml.py:167: needs a CUDA GPU
        FAILED tests/test_cuda.py::test_a - AssertionError: assert 1 == 2
        ERROR tests/test_cuda.py::test_b - RuntimeError: CUDA error
        ===== 1 failed, 2 passed, 1 skipped, 1 error in 4.56s =====
        """
    )
    counts, failures, summary = gpu_check.parse_pytest_output(output)
    assert failures == ["tests/test_cuda.py::test_a", "tests/test_cuda.py::test_b"]
    assert summary == "1 failed, 2 passed, 1 skipped, 1 error in 4.56s"
    assert counts == {"failed": 1, "passed": 2, "skipped": 1, "errors": 1}


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        ("NVIDIA GeForce RTX 4090 (laptop)", "NVIDIA-GeForce-RTX-4090-laptop"),
        ("Tesla T4", "Tesla-T4"),
        ("///", "cuda"),
    ],
)
def test_gpu_slug(name: str, slug: str) -> None:
    assert gpu_check.gpu_slug(name) == slug


# -- the report, from made-up figures ----------------------------------------------------------------------------
def _environment(**changes: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "gpu_index": 0,
        "gpu_total_bytes": 80 * 2**30,
        "compute_capability": "9.0",
        "torch": "2.14.1+cu130",
        "torch_cuda": "13.0",
        "cudnn": 91000,
        "torchvision": "0.29.1",
        "batchfinder": "0.1.0",
        "python": "3.11.7",
        "platform": "Linux-6.8-x86_64",
        "date": "2025-01-01T00:00:00+00:00",
        "seconds": 123.4,
        "nvml": {
            "available": True,
            "reason": None,
            "driver_version": "550.54.15",
            "cuda_driver_version": "12.4",
            "cuda_mapping": "by UUID, from torch",
            "gpu_index": 3,
            "uuid": "GPU-aaaa",
        },
    }
    env.update(changes)
    return env


def _figures() -> tuple[PytestRun, list[MemoryCheck], list[SearchCheck]]:
    tests = PytestRun(
        ["pytest", "-m", "cuda", "tests/"], 1, 31.5, {"passed": 5, "failed": 1, "skipped": 1, "deselected": 300},
        ["tests/test_cuda.py::test_a"], "1 failed, 5 passed, 1 skipped, 300 deselected in 30.00s",
    )
    memory = [
        MemoryCheck(
            "mnist_mlp", "MNIST MLP", "1x28x28 float32", 4096, estimate_peak=95 * MiB, estimate_phase="backward",
            max_allocated=100 * MiB, baseline_allocated=8 * MiB, max_reserved=128 * MiB, simulated_peak=95 * MiB,
            simulated_reserved=96 * MiB, seconds=1.5,
        ),
        MemoryCheck("resnet18", "torchvision resnet18", "3x64x64 float32", 64, skipped="torchvision does not import"),
        MemoryCheck(
            "transformer", "Transformer", "64 token ids", 256, estimate_peak=50 * MiB, simulated_peak=50 * MiB,
            errors=["CUDA: RuntimeError: CUDA error: an illegal memory access"],
        ),
    ]
    searches = [
        SearchCheck("mnist_mlp", "binsearch", 2 * 2**30, max_batch_size=458_600, batch_size=366_880, trials=37,
                    ooms=18, steps=74, seconds=40.2, stop_reason="bracket closed"),
        SearchCheck("mnist_mlp", "guided", 2 * 2**30, max_batch_size=458_600, batch_size=366_880, trials=3, ooms=1,
                    steps=6, seconds=5.1, stop_reason="bracket closed", predicted_max_batch_size=458_700,
                    prediction_status="recalibrated"),
        SearchCheck("transformer", "guided", 2 * 2**30, seconds=0.3, error="RuntimeError: boom"),
    ]
    return tests, memory, searches


def test_report_from_made_up_figures() -> None:
    markdown, data = gpu_check.build_report(_environment(), *_figures())
    assert markdown.startswith("# batchfinder GPU check: NVIDIA H100 80GB HBM3\n")
    for text in (
        "80.00 GiB", "compute capability 9.0", "NVIDIA driver 550.54.15, CUDA 12.4 (driver)", "NVML GPU 3",
        "by UUID, from torch", "torch 2.14.1+cu130 (CUDA 13.0", "123 s in all",
        "5 passed, 1 failed, 1 skipped, 0 errors (exit status 1, 31.5 s)", "* `tests/test_cuda.py::test_a`",
        (
            "| mnist_mlp | 1x28x28 float32 | 4,096 | 95.00 MiB | 100.00 MiB | 8.00 MiB | 128.00 MiB | 95.00 MiB | "
            "96.00 MiB | 0.950 | 1.033 |"
        ),
        "| resnet18 | 3x64x64 float32 | 64 | skipped: torchvision does not import |",
        "* transformer: CUDA: RuntimeError: CUDA error: an illegal memory access",
        "| transformer | 64 token ids | 256 | 50.00 MiB | - | - | - | 50.00 MiB | - | - | - |",
        "(memory_limit 2.00 GiB)",
        "| mnist_mlp | binsearch | 458,600 | 366,880 | 37 | 18 | 74 | 40.2 | bracket closed | - |",
        "| mnist_mlp | guided | 458,600 | 366,880 | 3 | 1 | 6 | 5.1 | bracket closed | 458,700 (recalibrated) |",
        "| transformer | guided | error: RuntimeError: boom |",
    ):
        assert text in markdown, text
    assert json.loads(json.dumps(data)) == data
    assert data["kind"] == "gpu_check" and data["environment"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert data["tests"]["ok"] is False and data["tests"]["counts"]["failed"] == 1
    mlp, resnet, transformer = data["memory"]
    assert mlp["ratio"] == 0.95 and mlp["ratio_without_baseline"] == round(95 / 92, 4)
    assert mlp["max_reserved"] == 128 * MiB and mlp["simulated_reserved"] == 96 * MiB
    assert resnet["skipped"] and resnet["ratio"] is None
    assert transformer["ratio"] is None and transformer["errors"]
    assert [s["mode"] for s in data["searches"]] == ["binsearch", "guided", "guided"]
    assert data["searches"][1]["predicted_max_batch_size"] == 458_700


def test_report_without_tests_or_driver() -> None:
    env = _environment(nvml={"available": False, "reason": "the pynvml module is not installed"})
    markdown, data = gpu_check.build_report(env, None, [], [])
    assert "Not run (`--skip-tests`)." in markdown
    assert "NVML: the pynvml module is not installed" in markdown
    assert data["tests"] is None and data["memory"] == [] and data["searches"] == []


def test_write_report(tmp_path: Path) -> None:
    markdown, data = gpu_check.build_report(_environment(), *_figures())
    md_path, json_path = gpu_check.write_report(tmp_path / "results", "NVIDIA-H100-80GB-HBM3", markdown, data)
    assert md_path.name == "NVIDIA-H100-80GB-HBM3-check.md" and json_path.name == "NVIDIA-H100-80GB-HBM3-check.json"
    assert md_path.read_text() == markdown
    assert json.loads(json_path.read_text()) == data


# -- the pieces that run on the CPU ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [spec.name for spec in gpu_check.MODELS])
def test_models_and_batches(name: str) -> None:
    spec = next(s for s in gpu_check.MODELS if s.name == name)
    try:
        model = spec.model(0)
    except ImportError:
        pytest.skip("torchvision is not installed")
    inputs, targets = spec.batch(3)
    assert inputs.shape == (3, *spec.input_shape) and targets.shape == (3,)
    assert inputs.dtype == (torch.int64 if spec.vocab_size else torch.float32) and targets.dtype == torch.int64
    assert int(targets.max()) < spec.num_classes
    same = spec.model(0)  # the seed decides the weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert model(inputs).shape == (3, spec.num_classes)
    assert spec.sample_bytes == inputs[0].numel() * inputs.element_size() + 8


@pytest.mark.parametrize("name", ["mnist_mlp", "bn_cnn", "transformer"])
def test_the_measured_step_is_the_step_the_estimator_traces(name: str) -> None:
    """The two steps gpu_check times on the GPU, replayed on a simulated GPU, peak where the estimate says."""
    spec = next(s for s in gpu_check.MODELS if s.name == name)
    model = spec.model(0)
    batch = spec.batch(16)
    estimate = bf.estimate_memory(model, (batch[0][0], batch[1][0]), 16, optimizer=torch.optim.Adam)
    peak, reserved = gpu_check.simulated_peaks(model, batch)
    assert abs(peak - estimate.peak) <= 0.01 * estimate.peak
    if reserved is not None:
        assert reserved >= peak


def _search_on_a_simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Make gpu_check's searches run on a simulated GPU of the memory limit (and its CUDA clean-up do nothing)."""
    calls: list[dict[str, Any]] = []
    real = bf.find_batch_size

    def on_simulated_gpu(model: Any, dataset: Any, **kwargs: Any) -> Any:
        calls.append(dict(kwargs, dataset_length=len(dataset)))
        assert kwargs.pop("device") == "cuda"
        return real(model, dataset, device=bf.SimulatedGPU(kwargs.pop("memory_limit")), **kwargs)

    monkeypatch.setattr(gpu_check.bf, "find_batch_size", on_simulated_gpu)
    monkeypatch.setattr(gpu_check, "_free_cuda", lambda: None)
    return calls


@pytest.mark.parametrize("mode", gpu_check.SEARCH_MODES)
def test_search_records_the_result(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    calls = _search_on_a_simulated_gpu(monkeypatch)
    spec = next(s for s in gpu_check.MODELS if s.name == "mnist_mlp")
    run = gpu_check.run_search(spec, mode, 4 * MiB, time_budget=60)
    assert run.error is None, run.error
    assert run.max_batch_size and run.batch_size == int(0.8 * run.max_batch_size)
    if mode == "guided":  # on the simulated GPU standing in for CUDA here, the trial confirms the prediction
        assert run.stop_reason == "prediction confirmed" and run.trials == 1 and run.ooms == 0 and run.steps
    else:
        assert run.stop_reason == "bracket closed" and run.trials and run.ooms and run.steps
    assert (run.predicted_max_batch_size is not None) == (mode == "guided")
    (call,) = calls
    assert call["mode"] == mode and call["memory_limit"] == 4 * MiB and call["optimizer"] is torch.optim.Adam
    assert call["time_budget"] == 60
    assert call["dataset_length"] == 4 * MiB // spec.sample_bytes + 1 > run.max_batch_size


def test_search_records_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*_: Any, **__: Any) -> Any:
        raise RuntimeError("CUDA error: out of luck\nsecond line")

    monkeypatch.setattr(gpu_check.bf, "find_batch_size", fails)
    monkeypatch.setattr(gpu_check, "_free_cuda", lambda: None)
    run = gpu_check.run_search(gpu_check.MODELS[0], "guided", 4 * MiB, time_budget=1)
    assert run.error == "RuntimeError: CUDA error: out of luck" and run.max_batch_size is None


def test_memory_check_keeps_what_it_measured_when_cuda_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def cuda_fails(*_: Any) -> dict[str, int]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "_measure_cuda", cuda_fails)
    monkeypatch.setattr(gpu_check, "_free_cuda", lambda: None)
    spec = gpu_check.ModelSpec("tiny", "a tiny MLP", gpu_check.mnist_mlp, (1, 28, 28), 10, 8)
    check = gpu_check.measure_memory(spec, torch.device("cpu"))
    assert check.estimate_peak and check.simulated_peak and check.max_allocated is None
    assert check.errors == ["CUDA: RuntimeError: CUDA error: an illegal memory access was encountered"]


def test_memory_check_skips_a_model_that_does_not_import() -> None:
    def needs_torchvision() -> torch.nn.Module:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    spec = gpu_check.ModelSpec("resnet18", "resnet18", needs_torchvision, (3, 64, 64), 10, 64)
    check = gpu_check.measure_memory(spec, torch.device("cpu"))
    assert check.skipped and "torchvision" in check.skipped and check.estimate_peak is None and not check.errors


def test_whole_run_with_the_cuda_parts_replaced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """main() end to end: the searches on a simulated GPU, made-up CUDA figures, no pytest run."""
    _search_on_a_simulated_gpu(monkeypatch)
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)  # for gpu_check only: the search runs on the CPU
    monkeypatch.setattr(gpu_check, "current_cuda_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(gpu_check, "environment", lambda device: _environment(nvml={"available": False, "reason": "x"}))
    monkeypatch.setattr(gpu_check, "warm_up", lambda device: 64 * MiB)
    figures = {"baseline_allocated": 0, "max_allocated": 4 * MiB, "max_reserved": 20 * MiB}
    monkeypatch.setattr(gpu_check, "_measure_cuda", lambda model, batch, device: dict(figures))

    def no_pytest(*_: Any) -> PytestRun:
        raise AssertionError("--skip-tests runs no tests")

    monkeypatch.setattr(gpu_check, "run_cuda_tests", no_pytest)
    status = gpu_check.main(
        ["--skip-tests", "--models", "mnist_mlp,bn_cnn", "--memory-limit", "4MiB", "--out", str(tmp_path)]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert out.startswith("# batchfinder GPU check: NVIDIA H100 80GB HBM3")
    data = json.loads((tmp_path / "NVIDIA-H100-80GB-HBM3-check.json").read_text())
    assert (tmp_path / "NVIDIA-H100-80GB-HBM3-check.md").read_text() in out + "\n"
    assert [m["model"] for m in data["memory"]] == ["mnist_mlp", "bn_cnn"]
    assert all(m["ratio"] == round(m["estimate_peak"] / (4 * MiB), 4) for m in data["memory"])
    assert [(s["model"], s["mode"]) for s in data["searches"]] == [("mnist_mlp", "binsearch"), ("mnist_mlp", "guided")]
    assert all(s["max_batch_size"] for s in data["searches"])
    assert "allocated after the warm-up (both threads' cuBLAS workspaces), in every baseline: 64.00 MiB" in out


def test_the_warm_up_creates_the_workspaces_of_both_threads() -> None:
    """A forward matmul alone leaves autograd's backward thread without its cuBLAS workspace: the first model's
    measurement would carry it (32 MiB on Hopper)."""
    gpu = bf.SimulatedGPU.like("H100-80GB")
    with gpu:
        assert gpu_check.warm_up(torch.device("cpu")) == 0  # the CPU has no allocator to read a baseline from
    assert sorted(gpu.ledger.workspaces) == ["backward", "forward"]
    assert gpu.memory_allocated() == 2 * 32 * MiB


def test_unknown_model_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--models", "mnist_mlp,vgg", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and not any(tmp_path.iterdir())


def test_pytest_run_counts_passes_failures_and_deselected(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'cuda: needs a GPU')\n"
    )
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """\
            import pytest

            @pytest.mark.cuda
            def test_passes():
                pass

            @pytest.mark.cuda
            def test_fails():
                assert False

            def test_not_cuda():
                pass
            """
        )
    )
    run = gpu_check.run_cuda_tests(120, paths=(str(tmp_path),), cwd=tmp_path)
    assert run.returncode == 1 and not run.ok
    assert run.counts == {"failed": 1, "passed": 1, "deselected": 1}
    assert run.failures == ["test_sample.py::test_fails"]
    assert run.command[:3] == ["pytest", "-m", "cuda"]


def test_pytest_run_that_runs_too_long(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(
        "import time\nimport pytest\n\n@pytest.mark.cuda\ndef test_slow():\n    time.sleep(30)\n"
    )
    run = gpu_check.run_cuda_tests(3, paths=(str(tmp_path),), cwd=tmp_path)
    assert run.returncode is None and not run.ok and run.summary.startswith("timed out after 3 s")


# -- on a GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_memory_check_of_the_mlp() -> None:
    spec = gpu_check.ModelSpec("mnist_mlp", "MNIST MLP", gpu_check.mnist_mlp, (1, 28, 28), 10, 1024)
    device = torch.device("cuda", torch.cuda.current_device())
    gpu_check.warm_up(device)
    check = gpu_check.measure_memory(spec, device)
    assert not check.errors, check.errors
    assert check.max_allocated and check.max_reserved and check.max_reserved >= check.max_allocated
    assert check.ratio_without_baseline is not None and 0.5 < check.ratio_without_baseline < 1.5
    env = gpu_check.environment(device)
    assert env["gpu_name"] == torch.cuda.get_device_name(device)
    if env["nvml"]["available"]:
        assert env["nvml"].get("name") == env["gpu_name"], env["nvml"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_guided_search_of_the_mlp() -> None:
    spec = next(s for s in gpu_check.MODELS if s.name == "mnist_mlp")
    run = gpu_check.run_search(spec, "guided", 256 * MiB, time_budget=30)
    assert run.error is None, run.error
    assert run.max_batch_size and run.trials
