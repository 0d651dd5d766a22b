"""The CUDA backend's defects, on a real GPU (skipped without one); ``test_device_defects.py`` shows each on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.devices.cuda import CudaDevice
from batchfinder.engine.options import SearchOptions
from batchfinder.engine.run import search
from batchfinder.engine.workload import Workload
from batchfinder.training.batching import BatchSource
from batchfinder.training.optimizers import resolve_optimizer
from batchfinder.training.state import AttributeSnapshot

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def _data(n: int = 20_000) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_memory_limit_holds_although_the_user_left_blocks_cached():  # defect 1
    cached = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    del cached  # 256 MiB now sit in PyTorch's cache
    result = bf.find_batch_size(_mlp().cuda(), _data(), device="cuda", memory_limit="64MiB")
    assert all(t.peak_reserved_bytes <= 64 * MiB for t in result.trials if t.fits)


def test_a_stricter_fraction_the_user_set_is_kept():  # defect 8
    if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
        pytest.skip("this torch cannot read the per-process memory fraction")
    torch.cuda.set_per_process_memory_fraction(0.05)
    try:
        total = torch.cuda.get_device_properties(0).total_memory
        with CudaDevice("cuda", memory_limit=total // 2).measuring():
            assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(0.05)
        assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(0.05)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_trials_record_reserved_peaks_and_errors_say_who_holds_memory():  # defect 2
    result = bf.find_batch_size(_mlp().cuda(), _data(), device="cuda", memory_limit="256MiB", max_trials=4)
    assert all(t.peak_reserved_bytes >= t.peak_bytes > 0 for t in result.trials)
    with pytest.raises(bf.NoBatchSizeFitsError, match="held outside this search's tensors"):
        huge = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 10)).cuda()
        bf.find_batch_size(huge, _data(), device="cuda", memory_limit="1MiB", step_fn=lambda m, b: m(b[0]).sum() + torch.empty(2**30, device="cuda").sum() * 0)


def test_a_cpu_model_keeps_its_tensors_and_statistics():  # defect 10
    model = _mlp()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = [id(t) for t in (*model.parameters(), *model.buffers())]
    bf.find_batch_size(model, _data(), device="cuda", memory_limit="256MiB", max_trials=4)
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == ids
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_the_first_search_in_a_fresh_process_leaks_nothing():  # defect 11
    code = (
        "import torch, batchfinder as bf; from torch import nn; from torch.utils.data import TensorDataset\n"
        "m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10)).cuda()\n"
        "d = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))\n"
        "r = bf.find_batch_size(m, d, device='cuda', memory_limit='128MiB', max_trials=3)\n"
        "print(max(t.leaked_bytes for t in r.trials))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "0"


def _fp16_workload(samples: int, *, init_scale: float = 2.0**16, clip_then_allocate: bool = False) -> tuple[Workload, Any]:
    """An fp16 training step with a GradScaler; with ``clip_then_allocate`` it unscales and clips, then allocates
    64 KiB per sample (so large batches run out of memory after ``unscale_``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    spec = resolve_optimizer(torch.optim.Adam, model)
    optimizer = spec.create()
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)

    def train_step(m: nn.Module, batch: Any, index: int) -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(m(batch[0]), batch[1])
        scaler.scale(loss).backward()
        if clip_then_allocate:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            torch.empty(len(batch[0]) * 64 * 1024, dtype=torch.uint8, device="cuda")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    data = TensorDataset(torch.randn(samples, 64), torch.randint(0, 10, (samples,)))
    workload = Workload(model, BatchSource(data), None, spec, train_step=train_step, extra_optimizers=[optimizer],
                        extra_state=[lambda: AttributeSnapshot(scaler, deep=True)])
    return workload, optimizer


def test_a_gradient_scaler_stage_does_not_survive_a_failed_trial():  # defect 3
    workload, _ = _fp16_workload(8192, clip_then_allocate=True)
    result = search(workload, CudaDevice("cuda", memory_limit="256MiB"), SearchOptions())
    assert result.num_ooms >= 1 and result.max_batch_size > 0


def test_skipped_steps_are_followed_until_the_optimizer_has_state(caplog):  # defect 4
    workload, optimizer = _fp16_workload(256, init_scale=2.0**18)  # the first steps overflow in float16: skipped
    result = search(workload, CudaDevice("cuda"), SearchOptions(init_batch_size=256, confirm_steps=0))
    first = result.trials[0]
    assert first.fits and 2 < first.steps <= 10  # steps went on past the skipped ones
    assert "still has no state" not in caplog.text  # until a step was taken and Adam's state existed
    assert not optimizer.state  # and the user's optimizer is as it was


def test_cudnn_not_supported_at_a_tiny_batch_is_reported_on_a_gpu():  # defect 9
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).cuda()

    def refused(m: nn.Module, batch: Any) -> torch.Tensor:
        m(batch[0])  # a real CUDA step, then what cuDNN raises for an unsupported configuration
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                           "non-contiguous input.")

    with pytest.raises(ValueError, match="unsupported layer configuration"):
        bf.find_batch_size(model, _data(), device="cuda", step_fn=refused)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_without_a_device_the_search_runs_on_the_gpu_the_model_is_on():  # defect 7
    model = _mlp().to("cuda:1")
    torch.cuda.set_device(0)
    result = bf.find_batch_size(model, _data(), memory_limit="256MiB", max_trials=3)
    assert result.device == CudaDevice("cuda:1", memory_limit="256MiB").name
    assert torch.cuda.max_memory_allocated(1) > 0


def _nccl_worker(rank: int, world: int, port: int, queue: Any) -> None:
    import os
    import traceback

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
        try:
            # No torch.cuda.set_device: the agreement must not run on whichever GPU is current (cuda:0 on both).
            result = bf.find_batch_size(_mlp(), _data(4096), device=f"cuda:{rank}", memory_limit="256MiB", max_trials=4)

            def fails_on_rank_1(m: nn.Module, batch: Any) -> torch.Tensor:
                if rank == 1 and len(batch[0]) > 16:
                    raise KeyError("a bug on rank 1 only")
                return nn.functional.cross_entropy(m(batch[0]), batch[1])

            try:
                bf.find_batch_size(_mlp(), _data(4096), device=f"cuda:{rank}", step_fn=fails_on_rank_1, max_trials=4)
                failure = "none"
            except bf.RankFailedError:
                failure = "RankFailedError"
            except KeyError:
                failure = "KeyError"
            queue.put((rank, (result.max_batch_size, result.world_size, failure)))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(), reason="needs two GPUs")
def test_ranks_on_nccl_agree_over_the_cpu_and_report_a_failing_rank():  # defects 5 and 6
    from test_distributed import _spawn

    results = _spawn(_nccl_worker)
    assert results[0][:2] == results[1][:2] and results[0][1] == 2
    assert (results[0][2], results[1][2]) == ("RankFailedError", "KeyError")
