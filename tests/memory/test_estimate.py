"""estimate_memory and estimate_memory_curve: the MNIST and CIFAR-10 MLPs' figures, byte-exact agreement with the
simulated GPU, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder import zoo
from batchfinder.memory.accounting import round_allocation
from batchfinder.memory.estimate import (
    Estimator,
    MemoryEstimate,
    MemoryEstimates,
    estimate_memory_curve,
)
from batchfinder.units import format_bytes
from tests.helpers import (
    DictDataset,
    DictLossModel,
    PartlyFrozen,
    SmallCNN,
    TinyTransformer,
    assert_unchanged,
    snapshot,
)

R = round_allocation  # every storage is rounded up to 512 bytes, as the CUDA caching allocator does


def _linear_bytes(inputs: int, outputs: int) -> int:
    """Charged bytes of one Linear layer's weight and bias (two storages, each rounded to 512 B)."""
    return R(inputs * outputs * 4) + R(outputs * 4)


# -- the MNIST and CIFAR-10 MLPs' figures ------------------------------------------------------------------------------
def test_mnist_mlp_figures():
    model = zoo.mnist_mlp()
    sgd = bf.estimate_memory(model, (1, 28, 28), 1024, optimizer=torch.optim.SGD)
    # 784x128 + 128 + 128x10 + 10 = 101,770 float32 parameters = 407,080 B; charged per storage: 407,552 B.
    assert sgd.parameter_count == 101_770
    assert sgd.exact["parameters"] == 101_770 * 4 == 407_080
    assert sgd.parameters == _linear_bytes(784, 128) + _linear_bytes(128, 10) == 407_552
    # Gradients double the parameters ("显存翻倍"); plain SGD keeps no state.
    assert sgd.gradients == sgd.parameters and sgd.exact["gradients"] == 407_080
    assert sgd.optimizer_state == 0
    # One MNIST image is 1x28x28 float32 = 3,136 B; its label an int64.
    assert sgd.sample_parts == {"input": 3136, "target": 8}
    assert sgd.batch == R(1024 * 3136) + R(1024 * 8)
    # Hidden activations: B x 128 x 4 bytes per hidden tensor (Linear output and ReLU output are both held).
    assert sgd.activations >= 2 * 1024 * 128 * 4
    adam = bf.estimate_memory(model, (1, 28, 28), 1024, optimizer=torch.optim.Adam)
    # Adam: two moments per parameter (2 x parameters) plus a step counter per parameter tensor.
    assert adam.optimizer_state == 2 * adam.parameters + 4 * 512
    assert adam.exact["optimizer_state"] == 2 * 407_080 + 4 * 4
    momentum = bf.estimate_memory(model, (1, 28, 28), 64, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert momentum.optimizer_state == momentum.parameters


def test_cifar10_mlp_figures():
    est = estimate_memory_curve(zoo.cifar10_mlp(), (torch.zeros(3, 32, 32), 7), [64, 256])
    first, second = est
    assert first.parameter_count == 394_634
    assert first.exact["parameters"] == 394_634 * 4
    assert first.parameters == _linear_bytes(3072, 128) + _linear_bytes(128, 10) == 1_579_008
    assert first.gradients == first.parameters
    assert first.optimizer_state == 2 * first.parameters + 4 * 512  # Adam by default
    assert first.sample_parts == {"input": 3 * 32 * 32 * 4, "target": 8}
    assert (first.batch, second.batch) == (R(64 * 12288) + R(64 * 8), R(256 * 12288) + R(256 * 8))


def test_shape_and_dataset_item_give_the_same_estimate():
    model = zoo.mnist_mlp()
    by_shape = bf.estimate_memory(model, (1, 28, 28), 300)
    by_string = bf.estimate_memory(model, "1x28x28", 300)
    by_item = bf.estimate_memory(model, (torch.randn(1, 28, 28), 3), 300)
    assert by_shape.as_dict() | {"sample": ""} == by_item.as_dict() | {"sample": ""}
    assert by_string.peak == by_shape.peak


def test_breakdown_adds_up_to_the_peak():
    for est in estimate_memory_curve(SmallCNN(), torch.zeros(3, 16, 16), [1, 50]):
        assert sum(est.at_peak.values()) == est.peak
        assert est.activations == est.at_peak["activations"] > 0
        assert est.buffers > 0 and est.at_peak["buffers"] == est.buffers  # BatchNorm running statistics
        assert est.at_peak["parameters"] == est.parameters
        assert 0 <= est.at_peak["gradients"] <= est.gradients
        assert est.peak == max(est.phase_peaks.values())
        assert est.peak_phase.split(" (")[0] in est.phase_peaks


def test_printing_gives_tables_in_human_units():
    est = bf.estimate_memory(zoo.mnist_mlp(), (1, 28, 28), 1024, optimizer=torch.optim.SGD)
    text = str(est)
    for word in ("parameters", "gradients", "optimizer state", "batch", "activations", "peak", "KiB", "MiB", "3,136 B"):
        assert word in text
    assert format_bytes(est.peak) in text
    table = str(estimate_memory_curve(zoo.mnist_mlp(), (1, 28, 28), [64, 256, 1024, 4096], optimizer=torch.optim.SGD))
    rows = [line for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r.split()[0].replace(",", "")) for r in rows] == [64, 256, 1024, 4096]


# -- agreement with the simulated GPU, to the byte --------------------------------------------------------------------
class TiedLM(nn.Module):
    """Input embedding and output projection share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 24)
        self.mix = nn.Linear(24, 24)
        self.out = nn.Linear(24, 60, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids)))).mean(1)


def _case(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return zoo.mnist_mlp(), TensorDataset(torch.randn(80, 1, 28, 28, generator=g), torch.randint(0, 10, (80,), generator=g))
    if name == "cnn-batchnorm":
        return SmallCNN(), TensorDataset(torch.randn(80, 3, 16, 16, generator=g), torch.randint(0, 5, (80,), generator=g))
    if name == "transformer":
        return TinyTransformer(classes=5), TensorDataset(torch.randint(0, 100, (80, 16), generator=g), torch.randint(0, 5, (80,), generator=g))
    if name == "partly-frozen":
        return PartlyFrozen(), TensorDataset(torch.randn(80, 48, generator=g), torch.randint(0, 3, (80,), generator=g))
    if name == "dict-own-loss":
        return DictLossModel(), DictDataset(80)
    if name == "tied-weights":
        return TiedLM(), TensorDataset(torch.randint(0, 60, (80, 10), generator=g), torch.randint(0, 60, (80,), generator=g))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mlp", "cnn-batchnorm", "transformer", "partly-frozen", "dict-own-loss", "tied-weights"])
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_peak_equals_the_simulated_gpu_to_the_byte(name, optimizer):
    model, dataset = _case(name)
    before = snapshot(model)
    sizes = [1, 24]
    estimates = estimate_memory_curve(model, dataset[0], sizes, optimizer=optimizer)
    assert_unchanged(before, model)  # the estimate leaves the model bit-identical
    for est in estimates:
        trial = bf.try_batch_size(model, dataset, est.batch_size, optimizer=optimizer, device=bf.SimulatedGPU("1GiB"))
        assert trial.fits
        assert est.peak == trial.peak_bytes, f"{name} at {est.batch_size}: estimate {est.peak} != simulated {trial.peak_bytes}"
    assert estimates[0].peak < estimates[-1].peak


def test_bound_optimizer_with_state_matches_and_is_untouched():
    model, dataset = _case("cnn-batchnorm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = dataset[:4]
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = snapshot(model, optimizer)
    est = bf.estimate_memory(model, dataset[0], 16, optimizer=optimizer)
    assert_unchanged(before, model, optimizer)
    trial = bf.try_batch_size(model, dataset, 16, optimizer=optimizer, device=bf.SimulatedGPU("1GiB"))
    assert est.peak == trial.peak_bytes


def test_model_on_the_meta_device_is_estimated_without_weights():
    with torch.device("meta"):
        meta = zoo.cifar10_mlp()
    real = zoo.cifar10_mlp()
    assert bf.estimate_memory(meta, (3, 32, 32), 128).peak == bf.estimate_memory(real, (3, 32, 32), 128).peak
    assert all(p.is_meta for p in meta.parameters())


def test_loss_fn_and_step_fn_are_used():
    model = zoo.mnist_mlp()
    sgd = torch.optim.SGD
    default = bf.estimate_memory(model, (1, 28, 28), 256, optimizer=sgd)

    def wide_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output.unsqueeze(2) * torch.ones(1, 1, 1024)).mean()  # a 256 x 10 x 1024 float temporary

    with_loss = bf.estimate_memory(model, (torch.zeros(1, 28, 28), 1), 256, optimizer=sgd, loss_fn=wide_loss)
    assert with_loss.peak >= default.peak + 256 * 10 * 1024 * 4 - 2 * 256 * 128 * 4
    with_step = bf.estimate_memory(model, torch.zeros(1, 28, 28), 256, optimizer=sgd, step_fn=lambda m, x: m(x).square().sum())
    assert with_step.sample_parts == {"input": 3136} and with_step.batch == R(256 * 3136)


# -- bad input ----------------------------------------------------------------------------------------------------------
def test_sample_the_model_rejects_is_a_clear_error_and_changes_nothing():
    model = zoo.mnist_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"sample.*\(3, 28, 28\).*\(1, 28, 28\)"):
        bf.estimate_memory(model, (3, 28, 28), 16)
    with pytest.raises(ValueError, match=r"sample.*Tensor\[16, 3, 32, 32\].*dataset\[0\]"):
        bf.estimate_memory(model, (torch.zeros(3, 32, 32), 1), 16)
    assert_unchanged(before, model)


def test_bad_arguments_name_the_argument():
    model = zoo.mnist_mlp()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        bf.estimate_memory("mlp", (1, 28, 28), 16)
    with pytest.raises(ValueError, match="batch_size=0"):
        bf.estimate_memory(model, (1, 28, 28), 0)
    with pytest.raises(TypeError, match="batch_size"):
        bf.estimate_memory(model, (1, 28, 28), 2.5)
    with pytest.raises(ValueError, match="empty"):
        estimate_memory_curve(model, (1, 28, 28), [])
    with pytest.raises(ValueError, match="sample=.*dimension below 1"):
        bf.estimate_memory(model, (1, 0, 28), 16)
    with pytest.raises(TypeError, match="sample must be one dataset item"):
        bf.estimate_memory(model, {"x": "text"}, 16)
    with pytest.raises(ValueError, match="steps_per_trial"):
        bf.estimate_memory(model, (1, 28, 28), 16, steps_per_trial=1)
    frozen = zoo.mnist_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bf.estimate_memory(frozen, (1, 28, 28), 16)


class ReadsValues(nn.Module):
    """A forward that looks at tensor values, which fake tensors do not have."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max().item() > 100:  # data-dependent control flow
            x = x / 100
        return self.fc(x)


def test_model_that_cannot_run_under_fake_tensors_says_so():
    model = ReadsValues()
    before = snapshot(model)
    with pytest.raises(bf.FakeTensorUnsupportedError, match="fake tensors.*find_batch_size") as info:
        bf.estimate_memory(model, (torch.zeros(8), 1), 16)
    assert isinstance(info.value, ValueError)
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="fake tensors"):
        bf.estimate_memory(model, (8,), 16)


# -- one return type per function ---------------------------------------------------------------------------------------
def test_estimate_memory_takes_one_batch_size_and_the_curve_takes_several(monkeypatch):
    model = zoo.mnist_mlp()
    one = bf.estimate_memory(model, (1, 28, 28), 256, optimizer=torch.optim.SGD)
    assert type(one) is MemoryEstimate
    for several in ([64, 256], (64, 256), range(64, 257, 192)):
        with pytest.raises(TypeError, match=r"batchfinder\.estimate\.estimate_memory_curve"):
            bf.estimate_memory(model, (1, 28, 28), several)
    created: list[object] = []
    real_create = Estimator.create.__func__

    def counting_create(cls, *args, **kwargs):
        created.append(cls)
        return real_create(cls, *args, **kwargs)

    monkeypatch.setattr(Estimator, "create", classmethod(counting_create))
    curve = estimate_memory_curve(model, (1, 28, 28), [1024, 64, 256], optimizer=torch.optim.SGD)
    assert len(created) == 1  # one estimator (the sample and arguments checked once) for every size
    assert type(curve) is MemoryEstimates and all(type(e) is MemoryEstimate for e in curve)
    assert [e.batch_size for e in curve] == [1024, 64, 256]  # one estimate per size, in the order asked
    assert curve[2].as_dict() == one.as_dict()  # the same figures, to the byte
    assert [e.batch_size for e in estimate_memory_curve(model, (1, 28, 28), range(1, 4))] == [1, 2, 3]
    with pytest.raises(TypeError, match="estimate_memory"):
        estimate_memory_curve(model, (1, 28, 28), 64)
    with pytest.raises(ValueError, match="empty"):
        estimate_memory_curve(model, (1, 28, 28), ())
    with pytest.raises(ValueError, match=r"batch_sizes\[1\]=0"):
        estimate_memory_curve(model, (1, 28, 28), [64, 0])
    assert "__iter__" not in vars(MemoryEstimates)  # a plain list of MemoryEstimate: no override of its own


def test_reserved_peak_equals_the_caching_simulated_gpu_to_the_byte():
    # Large enough that 20 MiB and request-sized segments, cached blocks and splits all occur.
    torch.manual_seed(0)
    cases = [
        (zoo.mnist_mlp(), TensorDataset(torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,))), 4096),
        (
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
            TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))),
            256,
        ),
    ]
    for model, dataset, size in cases:
        est = bf.estimate_memory(model, dataset[0], size, optimizer=torch.optim.Adam)
        trial = bf.try_batch_size(model, dataset, size, optimizer=torch.optim.Adam,
                                  device=bf.SimulatedGPU("4GiB", allocator="caching"))
        assert est.peak == trial.peak_bytes
        assert est.peak_reserved == trial.peak_reserved_bytes > est.peak  # 38 MiB and 150 MiB reserved
        assert est.peak_reserved % (2 * 2**20) == 0  # whole segments
