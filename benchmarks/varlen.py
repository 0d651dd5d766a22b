"""Workloads whose samples differ in size, for the epoch-survival benchmark (:mod:`benchmarks.survival`).

Each workload is a classifier, its synthetic dataset (deterministic, from a private seeded generator), the
``collate_fn`` a user would train it with, the size of every sample in the workload's own unit, and the capacity of
the simulated GPU it is benchmarked at:

* ``text``: 2,000 token-id sequences (1-D int64 tensors) with long-tailed lengths (log-normal, median 24 tokens,
  clipped to 4..256) and a heavier tail, as real corpora have: 4 of them (0.2%) are 768-1,024 tokens long, the longest
  1,024. An embedding + LSTM classifier, and a collate that pads every batch to its longest sequence. Size: tokens.
  A batch's cost is set by its longest sequence, so a batch without one of the 4 long ones costs a quarter of the
  worst case: a finder that tries a few shuffled batches seldom meets one, the epoch always does.
* ``images``: 1,000 RGB images of varying resolution (3xHxW, H and W in 16..96, log-normal scale with median 28 px
  and a random aspect ratio; the largest is 96x96), a small CNN ending in adaptive average pooling, and a collate that
  pads every batch to its largest H and its largest W. Size: pixels (H x W).
* ``fixed``: the control, 2,000 fixed-size 1x28x28 samples for the MNIST MLP of :mod:`batchfinder.zoo`, PyTorch's
  default collation. Size: elements (784 each).

In the variable-size datasets the samples are stored smallest first, so a finder that builds its batches from the
first samples sees only the short ones. Under a padding collate a batch costs its size times its largest sample, so
the worst-case batch of B (the B largest samples) costs as much as any batch of B that holds the largest sample: the
image generator makes the tallest and the widest image the same (96x96), so no mix of a tall and a wide image pads
past it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from batchfinder.zoo import mnist_mlp

from .workloads import WORKLOADS as ZOO

__all__ = [
    "SizedData",
    "ListDataset",
    "SurvivalWorkload",
    "SURVIVAL_WORKLOADS",
    "LSTMClassifier",
    "PaddedImageCNN",
    "pad_tokens",
    "pad_images",
    "long_tailed",
    "build_text_data",
    "text_long_samples",
    "build_image_data",
    "build_fixed_data",
    "largest_first",
]

PAD_ID = 0
"""Token id used for padding (real tokens are 1 .. vocab-1)."""
VOCAB_SIZE = 1000
TEXT_LONG_FRACTION = 0.002
"""Share of the text samples that are much longer than the rest (:data:`TEXT_LONG_LEN` tokens)."""
TEXT_LONG_LEN = (768, 1024)
"""Lengths of the text workload's few long samples (the longest is exactly 1,024)."""
TEXT_CLASSES = 2
IMAGE_CLASSES = 10


# -- data ----------------------------------------------------------------------------------------------------------
class ListDataset(Dataset):
    """A map-style dataset over a list of samples."""

    def __init__(self, samples: list[Any]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


@dataclass(frozen=True)
class SizedData:
    """A dataset and the size of each of its samples (in its workload's unit: tokens, pixels, elements)."""

    dataset: Dataset
    sizes: list[int]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(self.sizes)} sizes for {len(self.dataset)} samples")  # type: ignore[arg-type]


def largest_first(sizes: Sequence[float]) -> list[int]:
    """Sample indices ordered by decreasing size (ties by index): the worst-case batch of B is the first B."""
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


def long_tailed(
    count: int, generator: torch.Generator, *, median: float, sigma: float, low: int, high: int
) -> list[int]:
    """``count`` whole numbers from a log-normal distribution (``median``, ``sigma``), clipped to ``low``..``high``;
    the largest is set to ``high`` so that the tail always reaches it."""
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    values = (median * torch.exp(sigma * normal)).round().clamp(low, high).long()
    values[int(values.argmax())] = high
    return values.tolist()


def pad_tokens(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(token ids, label)`` samples (1-D tensors or lists of ints) into ``(tokens[B, L], labels[B])``,
    int64, padded with :data:`PAD_ID` to the longest sequence of the batch."""
    sequences = [torch.as_tensor(tokens, dtype=torch.int64) for tokens, _ in batch]
    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), longest), PAD_ID, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = sequence
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    return tokens, labels


def pad_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(image[C, H, W], label)`` samples into ``(images[B, C, H_max, W_max], labels[B])``, each image
    zero-padded at the bottom and right to the batch's largest height and largest width."""
    images = [image for image, _ in batch]
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    padded = torch.zeros((len(images), channels, height, width), dtype=images[0].dtype)
    for row, image in enumerate(images):
        padded[row, :, : image.shape[1], : image.shape[2]] = image
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    return padded, labels


def build_text_data(
    count: int = 2000,
    seed: int = 0,
    *,
    as_lists: bool = False,
    short_first: bool = True,
    max_len: int = 256,
    long_samples: int = 0,
    long_len: tuple[int, int] = (768, 1024),
) -> SizedData:
    """``count`` ``(token ids, label)`` samples with long-tailed lengths: log-normal (median 24 tokens) clipped to
    4..``max_len``, the longest set to ``max_len``; then, with ``long_samples``, that many of them (drawn at random)
    made much longer than the rest, ``long_len[0]``..``long_len[1]`` tokens with the longest exactly ``long_len[1]``
    (the few very long documents of a real corpus).

    Token ids are 1-D int64 tensors, or Python lists of ints with ``as_lists``. With ``short_first`` the samples are
    stored by increasing length (ties in generation order); otherwise in generation order. Size: the length.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    lengths = long_tailed(count, generator, median=24, sigma=0.9, low=4, high=max_len)
    if long_samples:
        low, high = long_len
        if not 0 < long_samples <= count or not max_len < low <= high:
            raise ValueError(f"long_samples={long_samples} of {count}, long_len={long_len} above max_len={max_len}")
        chosen = torch.randperm(count, generator=generator)[:long_samples].tolist()
        long_lengths = torch.randint(low, high + 1, (long_samples,), generator=generator).tolist()
        long_lengths[0] = high
        for index, length in zip(chosen, long_lengths):
            lengths[index] = length
    tokens = torch.randint(PAD_ID + 1, VOCAB_SIZE, (sum(lengths),), generator=generator)
    labels = torch.randint(0, TEXT_CLASSES, (count,), generator=generator).tolist()
    pieces = list(torch.split(tokens, lengths))
    order = sorted(range(count), key=lambda i: (lengths[i], i)) if short_first else list(range(count))
    samples: list[Any] = []
    for i in order:
        sequence = pieces[i].clone()  # its own storage: a view would keep (and charge) the whole token buffer
        samples.append((sequence.tolist() if as_lists else sequence, labels[i]))
    return SizedData(ListDataset(samples), [lengths[i] for i in order])


def text_long_samples(count: int) -> int:
    """How many of ``count`` text samples the text workload makes long (:data:`TEXT_LONG_FRACTION`, at least 1)."""
    return max(1, round(count * TEXT_LONG_FRACTION))


def build_image_data(count: int = 1000, seed: int = 0, *, low: int = 16, high: int = 96) -> SizedData:
    """``count`` ``(image[3, H, W], label)`` samples, float32, smallest first; H and W in ``low``..``high``.

    The scale is log-normal (median 28 px), the aspect ratio H/W log-normal around 1; the largest image is
    ``high`` x ``high``, so it is both the tallest and the widest. Size: H x W pixels.
    """
    generator = torch.Generator().manual_seed(20_000 + seed)
    scale = 28 * torch.exp(0.45 * torch.randn(count, generator=generator, dtype=torch.float64))
    aspect = torch.exp(0.2 * torch.randn(count, generator=generator, dtype=torch.float64)).sqrt()
    heights = (scale * aspect).round().clamp(low, high).long()
    widths = (scale / aspect).round().clamp(low, high).long()
    largest = int((heights * widths).argmax())
    heights[largest] = high
    widths[largest] = high
    shapes = list(zip(heights.tolist(), widths.tolist()))
    labels = torch.randint(0, IMAGE_CLASSES, (count,), generator=generator).tolist()
    order = sorted(range(count), key=lambda i: (shapes[i][0] * shapes[i][1], i))
    samples = []
    for i in order:
        height, width = shapes[i]
        samples.append((torch.randn((3, height, width), generator=generator), labels[i]))
    return SizedData(ListDataset(samples), [shapes[i][0] * shapes[i][1] for i in order])


def build_fixed_data(count: int = 2000, seed: int = 0) -> SizedData:
    """The control: ``count`` fixed-size 1x28x28 samples of the benchmark zoo's MNIST workload. Size: 784."""
    dataset = ZOO["mnist_mlp"].build_dataset(count, seed)
    numel = math.prod(ZOO["mnist_mlp"].input_shape)
    return SizedData(dataset, [numel] * count)


# -- models --------------------------------------------------------------------------------------------------------
class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> one-layer LSTM -> mean over time -> linear head."""

    def __init__(
        self, vocab_size: int = VOCAB_SIZE, embed_dim: int = 64, hidden: int = 128, num_classes: int = TEXT_CLASSES
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.embed(tokens))
        return self.head(outputs.mean(dim=1))


class PaddedImageCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 64 channels) with ReLU and 2x2 max pooling, adaptive average pooling to 1x1,
    a linear head: any input resolution."""

    def __init__(self, num_classes: int = IMAGE_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# -- workloads -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SurvivalWorkload:
    """A model, its data and collate function, and the simulated GPU capacity it is benchmarked at."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    data_factory: Callable[[int], SizedData]
    """``seed -> SizedData``."""
    collate_fn: Callable[[list[Any]], Any] | None
    """The loaders' ``collate_fn`` (None: PyTorch's default collation)."""
    capacity: str
    size_unit: str
    """What a sample's size counts: ``tokens``, ``pixels`` or ``elements``."""
    index_order: str = "smallest first"
    """How the dataset orders its samples (the variable-size ones: smallest first)."""

    def build_model(self, seed: int = 0) -> nn.Module:
        """The model, with weights drawn from ``seed`` (every finder and every epoch gets an identical fresh copy)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.factory()

    def build_data(self, seed: int = 0) -> SizedData:
        """The dataset and every sample's size."""
        return self.data_factory(seed)


SURVIVAL_WORKLOADS: dict[str, SurvivalWorkload] = {
    w.name: w
    for w in (
        SurvivalWorkload(
            "text",
            "embedding(1000, 64) + LSTM(64 -> 128) classifier; 2,000 token sequences, long-tailed lengths 4-256 "
            "(median 24) and 4 long ones of 768-1,024, padded to the batch's longest",
            LSTMClassifier,
            lambda seed: build_text_data(2000, seed, long_samples=text_long_samples(2000), long_len=TEXT_LONG_LEN),
            pad_tokens,
            "320MiB",
            "tokens",
        ),
        SurvivalWorkload(
            "images",
            "CNN 3x3 convs 16-32-64 + adaptive average pooling; 1,000 RGB images 16-96 px per side (median 28), "
            "padded to the batch's largest height and width",
            PaddedImageCNN,
            lambda seed: build_image_data(1000, seed),
            pad_images,
            "128MiB",
            "pixels",
        ),
        SurvivalWorkload(
            "fixed",
            "control: MNIST MLP 784-128-10 on 2,000 fixed-size 1x28x28 samples, default collation",
            mnist_mlp,
            lambda seed: build_fixed_data(2000, seed),
            None,
            "4MiB",
            "elements",
            "as generated (all the same size)",
        ),
    )
}
"""The workloads, in the order the benchmark runs them."""
