"""predict_max_batch_size: equal to what real trials find on the simulated GPU; GPU names and allowances."""

from __future__ import annotations

import resource
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder import zoo
from batchfinder.memory.gpus import (
    CUBLAS_WORKSPACE_BYTES,
    CUBLAS_WORKSPACE_BYTES_HOPPER,
    CUDA_CONTEXT_BYTES,
    GPUS,
    lookup_gpu,
)
from batchfinder.units import format_bytes
from tests.helpers import WideOutput, assert_unchanged, classification_data, make_case, snapshot

MiB = 2**20


def test_prediction_equals_the_binsearch_result_on_the_simulated_gpu():
    model = zoo.mnist_mlp()
    prediction = bf.predict_max_batch_size(model, (1, 28, 28), capacity="6MiB", optimizer=torch.optim.Adam)
    result = bf.find_batch_size(model, classification_data(4000, (1, 28, 28), 10), optimizer=torch.optim.Adam, device=bf.SimulatedGPU("6MiB"))
    assert prediction.max_batch_size == result.max_batch_size
    assert prediction.batch_size == result.batch_size == int(0.8 * result.max_batch_size)


def test_sizes_that_do_not_fit_are_reported_with_the_peak_they_would_need_not_the_one_reached_before_failing():
    # At 16 MiB the MNIST MLP's batch of 335 needs a 20 MiB segment (an allocation over 1 MiB): it fails at once, after
    # reaching about 2 MiB. Reported peaks of such sizes are above the capacity, in the prediction and in the search.
    capacity = 16 * 2**20
    prediction = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), capacity="16MiB", optimizer=torch.optim.Adam)
    result = bf.find_batch_size(zoo.mnist_mlp(), classification_data(4000, (1, 28, 28), 10), optimizer=torch.optim.Adam,
                                device=bf.SimulatedGPU("16MiB"), mode="guided")
    assert prediction.max_batch_size == result.max_batch_size == 334
    for curve in (prediction.curve, result.predicted_peaks):
        assert any(size > 334 for size in curve) and any(size <= 334 for size in curve)
        assert all((peak > capacity) == (size > 334) for size, peak in curve.items()), curve
        assert curve[335] >= 20 * 2**20  # the segment it cannot get
    assert prediction.next_peak_bytes > capacity


def test_the_size_above_the_answer_says_what_fails_and_why_not_a_jump_in_peak():
    # At 16 MiB the MNIST MLP's batch of 335 asks for a 20 MiB segment that the free memory cannot give: the report
    # names that request and the free memory, instead of a peak 4 MiB above the one at 334.
    prediction = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), capacity="16MiB", optimizer=torch.optim.Adam)
    assert prediction.max_batch_size == 334
    failure = prediction.next_failure
    assert failure is not None and "request of 20.00 MiB" in failure and "left free on the device" in failure
    line = next(line for line in str(prediction).splitlines() if line.startswith("largest batch size that fits"))
    assert f"at 335 {failure}" in line and "would need" not in line
    assert prediction.as_dict()["next_failure"] == failure


@pytest.mark.parametrize(
    "name, capacity, optimizer",
    [("cnn", "5MiB", torch.optim.Adam), ("dict", "3MiB", torch.optim.SGD), ("frozen", "2MiB", torch.optim.AdamW), ("mlp", "1MiB", torch.optim.Adam)],
)
def test_prediction_is_the_boundary_real_trials_find(name, capacity, optimizer):
    case = make_case(name)
    before = snapshot(case.model)
    prediction = bf.predict_max_batch_size(
        case.model, case.dataset[0], capacity=capacity, optimizer=optimizer, max_batch_size=len(case.dataset) - 1, allocator="ideal"
    )
    assert_unchanged(before, case.model)
    best = prediction.max_batch_size
    assert 1 <= best < len(case.dataset) - 1, "the capacity should bind before the dataset runs out"
    device = bf.SimulatedGPU(capacity, allocator="ideal")
    fits = bf.try_batch_size(case.model, case.dataset, best, optimizer=optimizer, device=device)
    too_many = bf.try_batch_size(case.model, case.dataset, best + 1, optimizer=optimizer, device=bf.SimulatedGPU(capacity, allocator="ideal"))
    assert fits.fits and not too_many.fits
    assert fits.peak_bytes == prediction.peak_bytes <= prediction.capacity_bytes < prediction.next_peak_bytes
    assert prediction.traces <= 12 and prediction.curve[best] == prediction.peak_bytes


def test_gpu_names_are_tolerant_and_the_allowance_is_subtracted():
    assert lookup_gpu("a100-40gb").name == lookup_gpu("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert lookup_gpu("rtx 4090").name == lookup_gpu("GeForce RTX 4090").name == "RTX-4090"
    assert lookup_gpu("H100").name == "H100-80GB" and lookup_gpu("t4").name == "T4"
    for name in ("T4", "V100-16GB", "V100-32GB", "A10G", "L4", "RTX-3090", "RTX-4090", "A100-40GB", "A100-80GB", "H100-80GB", "H200"):
        assert lookup_gpu(name).name == name
    assert lookup_gpu("A100-40GB").memory_bytes == 40 * 1024**3
    assert lookup_gpu("T4").allowance_bytes == lookup_gpu("H100").allowance_bytes == CUDA_CONTEXT_BYTES
    assert lookup_gpu("T4").usable_bytes == lookup_gpu("T4").memory_bytes - CUDA_CONTEXT_BYTES
    assert (lookup_gpu("T4").workspace_bytes, lookup_gpu("H100").workspace_bytes) == (
        CUBLAS_WORKSPACE_BYTES, CUBLAS_WORKSPACE_BYTES_HOPPER
    )
    assert len({g.name for g in GPUS}) == len(GPUS)

    model = zoo.cifar10_mlp()
    on_t4 = bf.predict_max_batch_size(model, (3, 32, 32), gpu="tesla-t4", optimizer=torch.optim.SGD, allocator="ideal")
    t4 = lookup_gpu("T4")
    # gpu= budgets the board's memory less the CUDA context; cuBLAS's workspaces (one for the forward pass, one for
    # the backward pass) are charged inside that budget, so in allocated bytes it is capacity= of what they leave.
    assert on_t4.gpu == t4 and on_t4.allowance_bytes == CUDA_CONTEXT_BYTES
    assert on_t4.capacity_bytes == t4.memory_bytes - CUDA_CONTEXT_BYTES
    same = bf.predict_max_batch_size(
        model, (3, 32, 32), capacity=on_t4.capacity_bytes - 2 * t4.workspace_bytes, optimizer=torch.optim.SGD, allocator="ideal"
    )
    assert same.max_batch_size == on_t4.max_batch_size > 100_000
    assert on_t4.peak_bytes <= on_t4.capacity_bytes < on_t4.next_peak_bytes


def test_unknown_or_ambiguous_gpu_lists_the_known_ones():
    model = zoo.mnist_mlp()
    with pytest.raises(ValueError, match=r"gpu='B9000'.*known GPUs: T4, .*A100-40GB.*H200"):
        bf.predict_max_batch_size(model, (1, 28, 28), gpu="B9000")
    with pytest.raises(ValueError, match="ambiguous.*A100-40GB, A100-80GB"):
        bf.predict_max_batch_size(model, (1, 28, 28), gpu="A100")
    with pytest.raises(ValueError, match="exactly one of capacity= .* or gpu="):
        bf.predict_max_batch_size(model, (1, 28, 28))
    with pytest.raises(ValueError, match="exactly one"):
        bf.predict_max_batch_size(model, (1, 28, 28), capacity="1GiB", gpu="T4")


def test_capacity_too_small_for_batch_size_one_says_what_it_needs():
    model = zoo.mnist_mlp()
    before = snapshot(model)
    need = bf.estimate_memory(model, (1, 28, 28), 1).peak
    with pytest.raises(ValueError, match=r"capacity='1MiB'.*too small for batch size 1: training needs " + format_bytes(need)):
        bf.predict_max_batch_size(model, (1, 28, 28), capacity="1MiB", allocator="ideal")
    assert_unchanged(before, model)
    # just enough for batch size 1
    assert bf.predict_max_batch_size(model, (1, 28, 28), capacity=need, allocator="ideal").max_batch_size == 1


def test_safety_multiple_of_and_cap():
    model = zoo.mnist_mlp()
    p = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB", safety=0.5, multiple_of=64)
    assert p.max_batch_size == 13374  # the field notes' largest size for this model, Adam and 64 MiB
    assert p.batch_size == 6687 // 64 * 64
    capped = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB", max_batch_size=1000)
    assert capped.max_batch_size == 1000 and capped.capped and capped.next_peak_bytes is None
    with pytest.raises(ValueError, match="safety"):
        bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB", safety=1.5)


def test_report_and_json():
    p = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), gpu="A100-40GB", optimizer=torch.optim.SGD)
    text = str(p)
    assert f"largest batch size that fits: {p.max_batch_size:,}" in text
    assert f"recommended batch size: {p.batch_size:,}" in text
    assert "CUDA context 512.00 MiB" in text and "optimizer state" in text
    data = p.as_dict()
    assert data["gpu"] == "A100-40GB" and data["max_batch_size"] == p.max_batch_size
    assert data["memory_bytes"] == 40 * 1024**3 and data["estimate"]["peak_reserved"] == p.peak_bytes
    assert data["allocator"] == "caching" and "reserved by the caching allocator" in text


class WideMLP(nn.Module):
    """About 117 million parameters: training it with Adam would take about 1.9 GB."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), *[nn.Sequential(nn.Linear(4096, 4096), nn.ReLU()) for _ in range(5)], nn.Linear(4096, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_large_model_on_the_meta_device_in_seconds_without_its_memory():
    with torch.device("meta"):
        model = WideMLP()
    params = sum(p.numel() for p in model.parameters())
    assert params > 100_000_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    p = bf.predict_max_batch_size(model, (4096,), gpu="T4", optimizer=torch.optim.Adam)
    seconds = time.perf_counter() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert p.estimate.parameters >= params * 4 and p.estimate.optimizer_state >= 2 * params * 4
    assert p.max_batch_size > 1000
    assert seconds < 60
    assert grown_mib < 500, f"the prediction allocated {grown_mib:.0f} MiB"
    assert all(t.is_meta for t in model.parameters())


# -- on the caching allocator, and for a named GPU ---------------------------------------------------------------------
def test_predictions_budget_reserved_bytes_and_match_the_caching_simulated_gpu():
    torch.manual_seed(0)
    model = zoo.mnist_mlp()
    data = TensorDataset(torch.randn(16000, 1, 28, 28), torch.randint(0, 10, (16000,)))
    predicted = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB")
    guided = bf.find_batch_size(model, data, device=bf.SimulatedGPU("64MiB"), mode="guided")
    assert guided.max_batch_size == predicted.max_batch_size and guided.num_trials == 1  # the prediction confirmed
    assert guided.prediction_status == "exact" and guided.num_ooms == 0
    assert predicted.peak_bytes <= 64 * MiB < predicted.next_peak_bytes  # reserved bytes, in whole segments
    ideal = bf.predict_max_batch_size(model, (1, 28, 28), capacity="64MiB", allocator="ideal")
    assert ideal.max_batch_size > predicted.max_batch_size  # allocated bytes alone overstate what fits
    assert "reserved by the caching allocator" in str(predicted)


def test_a_prediction_for_a_gpu_leaves_out_the_context_and_counts_the_workspaces():
    prediction = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), gpu="T4", optimizer=torch.optim.SGD)
    assert prediction.capacity_bytes == lookup_gpu("T4").memory_bytes - CUDA_CONTEXT_BYTES
    assert prediction.allowance_bytes == CUDA_CONTEXT_BYTES
    assert prediction.peak_bytes <= prediction.capacity_bytes
    with pytest.raises(ValueError, match="allocator='exact'"):
        bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), gpu="T4", allocator="exact")


def test_an_inference_prediction_where_nothing_fits_gives_no_optimizer_advice():
    with pytest.raises(ValueError, match="inference needs .* Use a larger GPU, mixed precision, or a smaller model"):
        bf.predict_max_batch_size(WideOutput(), (8,), capacity="4MiB", train=False)
    with pytest.raises(ValueError, match="training needs .* an optimizer with less state"):
        bf.predict_max_batch_size(WideOutput(), (8,), capacity="4MiB")
