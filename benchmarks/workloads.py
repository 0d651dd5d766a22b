"""The benchmark zoo: models, their synthetic data, the training step every finder runs, default capacities.

Every workload is a classifier trained with cross-entropy and Adam (PyTorch's defaults) on synthetic data of the
real shape. Its dataset repeats a small seeded pool of samples up to a length far beyond any batch that fits
(a batch is on the device, so one that fits has fewer than ``capacity // bytes per sample`` samples), so no finder
is ever stopped by the dataset's length, and host memory stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from batchfinder.zoo import cifar10_mlp, mnist_mlp

__all__ = [
    "Workload",
    "CyclicDataset",
    "WORKLOADS",
    "training_step",
    "make_optimizer",
    "mnist_mlp",
    "cifar10_mlp",
    "TokenClassifier",
    "RESNET50_CAPACITY",
]

POOL_SIZE = 256
"""Distinct samples in a workload's dataset; the dataset repeats them."""
FULL_BATCHES = 4
"""A workload's dataset holds this many full batches of the largest size that could possibly fit."""


# -- models ------------------------------------------------------------------------------------------------------------
class TokenClassifier(nn.Module):
    """A small Transformer encoder over token ids: embedding + learned positions, encoder layers, mean pool, head."""

    def __init__(
        self,
        vocab_size: int = 1000,
        seq_len: int = 64,
        d_model: int = 64,
        nhead: int = 4,
        dim_feedforward: int = 256,
        num_layers: int = 2,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]])
        return self.head(hidden.mean(dim=1))


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(num_classes=10)


# -- data ----------------------------------------------------------------------------------------------------------------
class CyclicDataset(Dataset):
    """``length`` samples that repeat a pool of ``(input, target)`` pairs; indexing is cheap and deterministic."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, length: int) -> None:
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError("inputs and targets must be non-empty and of equal length")
        self.inputs = inputs
        self.targets = targets
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        j = index % len(self.inputs)
        return self.inputs[j], self.targets[j]


# -- the training step -----------------------------------------------------------------------------------------------
def training_step(model: nn.Module, batch: Any) -> torch.Tensor:
    """Forward pass and cross-entropy loss of one ``(input, target)`` batch: the step every finder runs."""
    inputs, targets = batch[0], batch[1]
    return F.cross_entropy(model(inputs), targets)


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    """The optimizer every finder uses: Adam with PyTorch's defaults (two states per parameter)."""
    return torch.optim.Adam(params)


# -- workloads -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A model, the shape of its samples, and the capacities it is benchmarked at by default."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_kind: str
    """``"image"`` (float32 pixels) or ``"tokens"`` (int64 ids below :attr:`vocab_size`)."""
    num_classes: int
    default_capacities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Device kind (``"simulated"``, ``"cuda"``) -> capacities run when none are given."""
    vocab_size: int = 0

    def build_model(self, seed: int = 0) -> nn.Module:
        """The model, with weights drawn from ``seed`` (every finder gets an identical fresh copy)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.factory()

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample (input + int64 target) as the device holds it."""
        numel = 1
        for dim in self.input_shape:
            numel *= dim
        return numel * (4 if self.input_kind == "image" else 8) + 8

    def dataset_length(self, capacity_bytes: int) -> int:
        """Room for :data:`FULL_BATCHES` full batches of any size that can fit in ``capacity_bytes``.

        A batch of ``capacity_bytes // sample_bytes + 1`` samples cannot fit (the batch alone would not), so no
        finder is stopped by the length, and every epoch of every fitting size has enough full batches for a trial
        (Lightning's trials run 3 steps within one epoch).
        """
        return FULL_BATCHES * (capacity_bytes // self.sample_bytes + 1)

    def build_dataset(self, length: int, seed: int = 0) -> CyclicDataset:
        """``length`` samples repeating a seeded pool of :data:`POOL_SIZE` synthetic samples."""
        generator = torch.Generator().manual_seed(seed + 1)
        if self.input_kind == "image":
            inputs = torch.randn((POOL_SIZE, *self.input_shape), generator=generator)
        else:
            inputs = torch.randint(0, self.vocab_size, (POOL_SIZE, *self.input_shape), generator=generator)
        targets = torch.randint(0, self.num_classes, (POOL_SIZE,), generator=generator)
        return CyclicDataset(inputs, targets, length)

    def describe_input(self) -> str:
        """E.g. ``1x28x28 float32`` or ``64 token ids``."""
        if self.input_kind == "image":
            return "x".join(map(str, self.input_shape)) + " float32"
        return f"{self.input_shape[0]} token ids (vocab {self.vocab_size})"


_GPU_LARGE = ("2GiB", "8GiB", "16GiB", "24GiB")
RESNET50_CAPACITY = "1536MiB"
"""resnet50's simulated capacity: the exact largest batch size at 3x224x224 with Adam is 13 there."""

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "mnist_mlp",
            "MNIST MLP 784-128-10",
            mnist_mlp,
            (1, 28, 28),
            "image",
            10,
            {"simulated": ("16MiB", "64MiB"), "cuda": ("2GiB",)},
        ),
        Workload(
            "cifar10_mlp",
            "CIFAR-10 MLP 3072-128-10",
            cifar10_mlp,
            (3, 32, 32),
            "image",
            10,
            # 24 MiB, not 16: with the caching allocator the model alone reserves 22 MiB (its 1.5 MiB weight and
            # Adam state come from a 20 MiB segment, the small tensors from a 2 MiB one).
            {"simulated": ("24MiB", "64MiB"), "cuda": ("2GiB",)},
        ),
        Workload(
            "resnet18",
            "torchvision resnet18, 10 classes, 64x64 input",
            _resnet18,
            (3, 64, 64),
            "image",
            10,
            {"simulated": ("224MiB",), "cuda": _GPU_LARGE},
        ),
        Workload(
            "transformer",
            "Transformer encoder, 2 layers, d=64, 4 heads, 64 tokens",
            TokenClassifier,
            (64,),
            "tokens",
            2,
            {"simulated": ("32MiB",), "cuda": _GPU_LARGE},
            vocab_size=1000,
        ),
        Workload(
            "resnet50",
            "torchvision resnet50, 10 classes, 224x224 input",
            _resnet50,
            (3, 224, 224),
            "image",
            10,
            # 1.5 GiB: the exact largest size is 13 (bf.predict_max_batch_size agrees), so a trial is a few seconds
            # of CPU per step, the cost that decides between a search of ~10 trials and a prediction with 2.
            {"simulated": (RESNET50_CAPACITY,), "cuda": _GPU_LARGE},
        ),
    )
}
"""The zoo, in the order the benchmark runs it."""
