"""precision=: CUDA's autocast policies on CPU tensors, exact estimates, and the user's model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.training.precision import (
    CUDA_POLICIES,
    PRECISIONS,
    _base,
    _registered,
    cuda_autocast,
)
from tests.helpers import TinyTransformer, assert_unchanged, snapshot


def _ops(x: torch.Tensor, w: torch.Tensor, image: torch.Tensor, kernel: torch.Tensor) -> dict[str, torch.Tensor]:
    """Operations whose autocast treatment differs between CUDA and the CPU, and some that agree."""
    a = nn.functional.linear(x, w)
    c = nn.functional.conv2d(image, kernel)
    return {
        "linear": a,
        "matmul": x @ w.T,
        "conv2d": c,
        "softmax": torch.softmax(a, -1),
        "log_softmax": torch.log_softmax(a, -1),
        "layer_norm": nn.functional.layer_norm(a, (a.shape[-1],)),
        "group_norm": nn.functional.group_norm(c, 1),
        "sum": a.sum(),
        "exp": a.exp(),
        "pow": a.pow(2),
        "mse_loss": nn.functional.mse_loss(a, torch.zeros_like(a)),
        "cross_entropy": nn.functional.cross_entropy(a, torch.zeros(a.shape[0], dtype=torch.long, device=a.device)),
        "cat": torch.cat([a, x[:, : a.shape[1]]]),
        "stack": torch.stack([a, x[:, : a.shape[1]]]),
        "addcmul": torch.addcmul(a, a, x[:, : a.shape[1]]),
        "upsample": nn.functional.interpolate(c, scale_factor=2.0, mode="bilinear"),
        "max_pool3d": nn.functional.max_pool3d(image.unsqueeze(0), 1),  # the CPU casts it to float32, CUDA does not
    }


def _cuda_dtypes(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """What CUDA's own autocast does, run on fake CUDA tensors (no GPU needed: nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        args = (torch.empty(4, 8, device="cuda"), torch.empty(6, 8, device="cuda", requires_grad=True),
                torch.empty(2, 3, 8, 8, device="cuda"), torch.empty(4, 3, 3, 3, device="cuda"))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        torch.autocast_increment_nesting()
        try:
            return {name: out.dtype for name, out in _ops(*args).items()}
        finally:
            torch.set_autocast_enabled("cuda", False)
            torch.autocast_decrement_nesting()
            torch.clear_autocast_cache()


def _cpu_args() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return torch.randn(4, 8), torch.randn(6, 8, requires_grad=True), torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_emulation_casts_what_cuda_casts_where_the_cpu_policy_differs(dtype):
    cuda = _cuda_dtypes(dtype)
    with cuda_autocast(dtype):
        emulated = {name: out.dtype for name, out in _ops(*_cpu_args()).items()}
    with torch.autocast("cpu", dtype=dtype):
        cpu = {name: out.dtype for name, out in _ops(*_cpu_args()).items()}
    assert emulated == cuda
    differ = sorted(name for name in cuda if cpu[name] != cuda[name])
    # CUDA runs these in float32; the CPU's autocast keeps them in the lower precision (or casts cat/stack/pooling).
    assert {"softmax", "log_softmax", "layer_norm", "group_norm", "sum", "exp", "pow", "upsample"} <= set(differ), differ
    assert cuda["linear"] == cuda["matmul"] == cuda["conv2d"] == dtype and cuda["softmax"] == torch.float32


def test_every_operation_cuda_autocasts_has_a_policy_and_the_cpu_kernels_come_back():
    registered = {_base(name) for name in _registered("AutocastCUDA")}
    assert registered <= set(CUDA_POLICIES), sorted(registered - set(CUDA_POLICIES))
    x = torch.randn(3, 5)
    with cuda_autocast(torch.bfloat16):
        assert torch.softmax(x @ x.T, -1).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own kernels again
        assert torch.softmax(x @ x.T, -1).dtype == torch.bfloat16
    with cuda_autocast(torch.float16), pytest.raises(RuntimeError, match="unsafe to autocast"):
        nn.functional.binary_cross_entropy(torch.rand(3), torch.rand(3))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_estimates_equal_trials_to_the_byte_in_every_precision(precision):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=200, dim=64, hidden=128, dropout=0.0)
    data = TensorDataset(torch.randint(0, 200, (512, 32)), torch.randint(0, 3, (512,)))
    before = snapshot(model)
    trial = bf.try_batch_size(model, data, 48, device=bf.SimulatedGPU("1GiB", allocator="ideal"), precision=precision)
    estimate = bf.estimate_memory(model, data, 48, precision=precision)
    assert trial.fits and trial.peak_bytes == estimate.peak
    assert_unchanged(before, model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_mixed_precision_fits_more_and_the_search_says_so():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=200, dim=64, hidden=128, dropout=0.0)
    data = TensorDataset(torch.randint(0, 200, (4096, 32)), torch.randint(0, 3, (4096,)))
    full = bf.find_batch_size(model, data, device=bf.SimulatedGPU("48MiB"), confirm_steps=0)
    mixed = bf.find_batch_size(model, data, device=bf.SimulatedGPU("48MiB"), precision="bf16-mixed", mode="guided",
                               confirm_steps=0)
    # With CUDA's attention kernels (no N x N matrix in either precision) bf16 halves the activations the kernels
    # keep, not an attention matrix as well: 206 against 182 here.
    assert mixed.max_batch_size > 1.1 * full.max_batch_size
    assert mixed.prediction_status == "exact"  # guided mode's prediction follows the same policy as the trials
    prediction = bf.predict_max_batch_size(model, (torch.randint(0, 200, (32,)), torch.tensor(1)), capacity="48MiB",
                                           precision="bf16-mixed")
    assert prediction.max_batch_size == mixed.max_batch_size


def test_float16_with_a_grad_scaler_runs_and_leaves_the_users_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters())
    data = TensorDataset(torch.randn(1024, 16), torch.randint(0, 4, (1024,)))
    before = snapshot(model, optimizer)
    result = bf.find_batch_size(model, data, optimizer=optimizer, device=bf.SimulatedGPU("8MiB"), precision="16-mixed")
    assert result.max_batch_size > 0 and result.confirmations[-1].fits
    assert_unchanged(before, model, optimizer)


def test_an_unknown_precision_is_refused_with_the_valid_ones():
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for call in (
        lambda: bf.find_batch_size(model, data, device="sim:1MiB", precision="fp16"),
        lambda: bf.try_batch_size(model, data, 2, device="sim:1MiB", precision=16),
        lambda: bf.estimate_memory(model, (4,), 2, precision="mixed"),
        lambda: bf.predict_max_batch_size(model, (4,), capacity="1MiB", precision="half"),
    ):
        with pytest.raises(ValueError, match=r"is not a training precision; choose one of \['32-true', '16-mixed'"):
            call()


def test_the_charged_memory_follows_cudas_lists_not_the_cpus():
    torch.manual_seed(0)
    x, w = torch.randn(256, 128), torch.randn(512, 128)

    def charged_by_softmax(autocast: object) -> int:
        with bf.SimulatedGPU("64MiB", allocator="ideal") as gpu, autocast:
            scores = nn.functional.linear(x, w)  # lower precision under both policies
            before = gpu.memory_allocated()
            probabilities = torch.softmax(scores, -1)
            charged = gpu.memory_allocated() - before
            del probabilities, scores
        return charged

    cuda = charged_by_softmax(cuda_autocast(torch.bfloat16))
    cpu = charged_by_softmax(torch.autocast("cpu", dtype=torch.bfloat16))
    assert cuda == 256 * 512 * 4 and cpu == 256 * 512 * 2  # float32 probabilities on CUDA, bfloat16 on the CPU


class _HalfOnlyKernel(nn.Module):
    """Like flash attention (or HF's ``flash_attention_2`` on a float32-loaded model): a kernel that only takes float16
    or bfloat16 inputs, which autocast gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.inner(x.flatten(1))
        if hidden.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")
        return self.out(hidden)


@pytest.mark.parametrize("mode", ["binsearch", "guided"])
def test_the_model_check_on_entry_runs_under_the_searchs_autocast(mode):
    data = TensorDataset(torch.randn(512, 64), torch.randint(0, 10, (512,)))
    result = bf.find_batch_size(
        _HalfOnlyKernel(), data, device=bf.SimulatedGPU("64MiB"), precision="bf16-mixed", mode=mode, max_trials=2
    )
    assert result.max_batch_size >= 16
