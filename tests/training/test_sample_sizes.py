"""Worst-case batches for data whose samples vary in size, and the confirmation run in the loader's order."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    TensorDataset,
)

import batchfinder as bf
from batchfinder.training.batching import BatchSource
from batchfinder.training.sample_sizes import (
    FIXED_CHECK_SECONDS,
    PROBE_SAMPLES,
    element_count,
    scan_sizes,
)
from tests.helpers import assert_unchanged, snapshot

VOCAB = 500


class TokenBag(nn.Module):
    """Embedding, a position-wise MLP over every token, mean over the tokens, a head: memory grows with B x length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.mix = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(tokens)).mean(dim=1))


def long_tailed_texts(count: int = 1200, longest: int = 256, seed: int = 0) -> list[tuple[list[int], int]]:
    """Token-id lists whose lengths are long-tailed (most short, a few up to ``longest``), the short ones first."""
    generator = torch.Generator().manual_seed(seed)
    lengths = sorted(int(4 + (longest - 4) * torch.rand(1, generator=generator).item() ** 5) for _ in range(count))
    lengths[-1] = longest
    return [(torch.randint(0, VOCAB, (n,), generator=generator).tolist(), i % 2) for i, n in enumerate(lengths)]


def pad_collate(samples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to the longest sample of the batch, as a text loader does."""
    longest = max(len(tokens) for tokens, _ in samples)
    batch = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (tokens, _) in enumerate(samples):
        batch[row, : len(tokens)] = torch.tensor(tokens)
    return batch, torch.tensor([label for _, label in samples])


def text_loader(data: Any, batch_size: int = 32, **kwargs: Any) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=pad_collate, **kwargs)


def one_shuffled_epoch(model: nn.Module, data: Any, batch_size: int, capacity: str, seed: int = 1) -> int | None:
    """Train one shuffled epoch at ``batch_size`` on a simulated GPU; the step that ran out of memory, or None."""
    optimizer = torch.optim.Adam(model.parameters())
    loader = text_loader(data, batch_size, generator=torch.Generator().manual_seed(seed))
    with bf.SimulatedGPU(capacity) as gpu:
        resident = gpu.to_device(model)
        for step, (tokens, labels) in enumerate(loader):
            try:
                loss = nn.functional.cross_entropy(resident(gpu.to_device(tokens)), gpu.to_device(labels))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError:
                return step
    return None


@pytest.fixture(scope="module")
def texts() -> list[tuple[list[int], int]]:
    return long_tailed_texts()


def test_the_search_runs_on_the_largest_samples_and_the_recommendation_survives_a_shuffled_epoch(texts):
    torch.manual_seed(0)
    model = TokenBag()
    before = snapshot(model)
    result = bf.find_batch_size(model, text_loader(texts), optimizer=torch.optim.Adam, device=bf.SimulatedGPU("24MiB"))
    assert_unchanged(before, model)
    scan = result.data_scan
    assert scan is not None and scan.varies and scan.complete and scan.scanned == scan.total == len(texts)
    assert scan.largest_size == 256 + 1 and scan.largest_index == len(texts) - 1  # 256 tokens and the label
    assert "data: scanned 1,200 of 1,200 samples" in str(result) and result.as_dict()["data_scan"]["varies"]

    # The largest size is exact for the worst-case batch: the B largest samples, padded to the longest.
    worst_first = sorted(texts, key=lambda s: -len(s[0]))
    for size, fits in ((result.max_batch_size, True), (result.max_batch_size + 1, False)):
        trial = bf.try_batch_size(model, DataLoader(worst_first, collate_fn=pad_collate), size,
                                  optimizer=torch.optim.Adam, device=bf.SimulatedGPU("24MiB"), sample_size=[1] * len(texts))
        assert trial.fits is fits, size

    # The first samples are short: a search that used them would report far more than the worst case allows.
    first_only = bf.find_batch_size(model, text_loader(texts), optimizer=torch.optim.Adam, device=bf.SimulatedGPU("24MiB"),
                                    sample_size=[1] * len(texts), confirm_steps=0)
    assert first_only.data_scan is not None and not first_only.data_scan.varies
    assert first_only.max_batch_size > 3 * result.max_batch_size
    assert one_shuffled_epoch(TokenBag(), texts, first_only.batch_size, "24MiB") is not None

    # The recommendation survives a whole shuffled epoch and is not needlessly small.
    assert result.batch_size >= 0.9 * math.floor(0.8 * result.max_batch_size)
    assert one_shuffled_epoch(TokenBag(), texts, result.batch_size, "24MiB") is None

    # The confirmation ran the loader's first batches, then the worst-case batch, with the cache kept.
    (confirmation,) = result.confirmations
    assert confirmation.fits and confirmation.steps == 3 and confirmation.batch_size == result.batch_size
    assert "batches in the loader's order, then the largest samples" in str(result)
    assert result.confirmed_allocated_fraction == confirmation.peak_bytes / (24 * 2**20)


def test_try_batch_size_and_guided_mode_use_the_worst_case_batch(texts):
    torch.manual_seed(0)
    model = TokenBag()
    loader = text_loader(texts)
    gpu = bf.SimulatedGPU("1GiB", allocator="ideal")
    trial = bf.try_batch_size(model, loader, 40, optimizer=torch.optim.Adam, device=gpu)
    assert trial.data_scan is not None and trial.data_scan.varies and trial.as_dict()["data_scan"]["scanned"] == 1200
    estimate = bf.estimate_memory(model, loader, 40, optimizer=torch.optim.Adam)
    assert estimate.sample_index == len(texts) - 1 and "from dataset[1,199], the largest sample" in estimate.sample
    assert estimate.sample.startswith("(Tensor[B, 256] int64, Tensor[B] int64)")
    assert estimate.peak == trial.peak_bytes  # the estimator and the trial see the same worst-case batch

    binsearch = bf.find_batch_size(model, loader, optimizer=torch.optim.Adam, device=bf.SimulatedGPU("24MiB", allocator="ideal"))
    guided = bf.find_batch_size(model, loader, optimizer=torch.optim.Adam, device=bf.SimulatedGPU("24MiB", allocator="ideal"),
                                mode="guided")
    assert guided.max_batch_size == binsearch.max_batch_size and guided.num_trials <= 3 and guided.num_ooms <= 1

    prediction = bf.predict_max_batch_size(model, loader, capacity="24MiB", optimizer=torch.optim.Adam, allocator="ideal")
    assert prediction.max_batch_size == binsearch.max_batch_size
    assert "the largest sample" in str(prediction)


def test_fixed_size_data_is_recognised_cheaply_and_batches_are_the_first_samples():
    calls: list[int] = []

    class Counting(Dataset):
        def __len__(self) -> int:
            return 2_000_000

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            calls.append(index)
            time.sleep(0.0002)
            return torch.full((3,), float(index)), index % 3

    started = time.perf_counter()
    source = BatchSource(Counting())
    assert time.perf_counter() - started < FIXED_CHECK_SECONDS + 1.0  # the probe, then a quarter of a second
    assert not source.varies and source.order is None and PROBE_SAMPLES <= source.scan.scanned < 2_000_000
    assert len(calls) <= source.scan.scanned + 2  # dataset[0] once for the checks and once for the label
    assert "fixed-size" in source.scan.describe() and source.scan.complete
    assert source.batch(4)[0][:, 0].tolist() == [0, 1, 2, 3]

    tensors = BatchSource(TensorDataset(torch.randn(1000, 2), torch.arange(1000)))
    assert not tensors.varies and tensors.scan.scanned == PROBE_SAMPLES and tensors.batch(3)[1].tolist() == [0, 1, 2]


def test_a_rare_larger_sample_among_identical_ones_is_found_when_samples_are_cheap():
    class MostlySquare(Dataset):
        def __len__(self) -> int:
            return 5_000

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            side = 64 if index == 1_234 else 16  # one large image the evenly spaced probe does not hit
            return torch.zeros(3, side, side), 0

    source = BatchSource(MostlySquare())
    assert source.varies and source.largest_index == 1_234 and source.scan.complete
    assert source.batch(1)[0].shape == (1, 3, 64, 64)


def test_sizes_from_sample_size_a_sequence_or_a_callable_order_the_batches(texts):
    lengths = [len(tokens) for tokens, _ in texts]
    by_list = BatchSource(text_loader(texts), sample_size=lengths)
    assert by_list.varies and by_list.scan.measure == "sample_size" and by_list.scan.largest_size == 256
    assert by_list.batch(5)[0].shape == (5, 256)
    assert list(by_list.indices(5)) == sorted(range(len(texts)), key=lambda i: (-lengths[i], i))[:5]
    by_callable = BatchSource(text_loader(texts), sample_size=lambda i: lengths[i])
    assert list(by_callable.indices(50)) == list(by_list.indices(50))
    # A user size that says the *first* samples are the largest is believed: batches are then built from those.
    reverse = BatchSource(text_loader(texts), sample_size=[-i + len(texts) for i in range(len(texts))])
    assert list(reverse.indices(3)) == [0, 1, 2] and reverse.varies


def test_element_counts_of_the_kinds_of_samples_people_have():
    assert element_count(torch.zeros(3, 4)) == 12
    assert element_count((torch.zeros(2, 5), 7)) == 11
    assert element_count({"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "label": 0}) == 7
    assert element_count([[1, 2], [3, 4, 5]]) == 5
    assert element_count("twelve chars") == 12
    np = pytest.importorskip("numpy")
    assert element_count((np.zeros((4, 4)), 1)) == 17


def test_a_partial_scan_is_reported_and_warned_about():
    class Slow(Dataset):
        def __len__(self) -> int:
            return 5_000

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            time.sleep(0.0005)
            return torch.zeros(1 + index % 97), 0

    with pytest.warns(UserWarning, match="scan_budget") as caught:
        scan, order = scan_sizes(Slow().__getitem__, 5_000, budget=0.2)
    assert len([w for w in caught if "scan_budget" in str(w.message)]) == 1  # once per scan
    assert scan.varies and not scan.complete and PROBE_SAMPLES <= scan.scanned < 5_000
    assert order is not None and sorted(order) == list(range(5_000))
    assert "partial" in scan.describe() and f"scanned {scan.scanned:,} of 5,000 samples" in scan.describe()


def test_bad_sample_size_and_scan_budget_are_refused_before_anything_runs(texts):
    torch.manual_seed(0)
    model = TokenBag()
    optimizer = torch.optim.Adam(model.parameters())
    before = snapshot(model, optimizer)
    loader = text_loader(texts)
    gpu = bf.SimulatedGPU("24MiB")
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"sample_size": [1, 2, 3]}, ValueError, "sample_size has 3 entries but the data set has 1,200"),
        ({"sample_size": "lengths"}, TypeError, "sample_size must be a callable"),
        ({"sample_size": {"a": 1}}, TypeError, "sample_size must be a callable"),
        ({"sample_size": lambda i: "long"}, TypeError, r"sample_size\(\d+\) is str"),
        ({"sample_size": [1.0] * 1199 + [float("nan")]}, ValueError, r"sample_size\[1199\] is nan"),
        ({"sample_size": [-1] * 1200}, ValueError, "non-negative"),
        ({"scan_budget": 0}, ValueError, "scan_budget=0 must be a positive"),
        ({"scan_budget": -1.5}, ValueError, "scan_budget=-1.5"),
        ({"scan_budget": float("inf")}, ValueError, "finite"),
        ({"scan_budget": "10"}, TypeError, "scan_budget must be a number of seconds"),
        ({"scan_budget": True}, TypeError, "scan_budget must be a number of seconds"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            bf.find_batch_size(model, loader, optimizer=optimizer, device=gpu, **kwargs)
        with pytest.raises(error, match=message):
            bf.try_batch_size(model, loader, 4, optimizer=optimizer, device=gpu, **kwargs)
    with pytest.raises(ValueError, match="sample_size applies when sample is a Dataset"):
        bf.estimate_memory(model, (16,), 4, sample_size=[1])
    assert gpu.memory_allocated() == 0
    assert_unchanged(before, model, optimizer)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from texts

    with pytest.raises(TypeError, match="IterableDataset"):
        bf.find_batch_size(model, DataLoader(Stream(), collate_fn=pad_collate), device=gpu)


def test_loader_order_follows_the_sampler_and_leaves_every_random_state_alone(texts):
    sequential = BatchSource(DataLoader(texts, batch_size=8, collate_fn=pad_collate))
    (first,) = sequential.loader_batches(4, 1)
    assert first[1].tolist() == [0, 1, 0, 1]  # the first four samples, as a sequential loader yields them

    generator = torch.Generator().manual_seed(7)
    shuffled = BatchSource(DataLoader(texts, batch_size=8, shuffle=True, collate_fn=pad_collate, generator=generator))
    state, global_state = generator.get_state(), torch.get_rng_state()
    batches = shuffled.loader_batches(10, 3)
    assert [len(b[1]) for b in batches] == [10, 10, 10]
    assert torch.equal(generator.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)
    assert len(shuffled.loader_batches(1000, 3)) == 2  # 1,200 samples: one full batch and a partial one

    class EveryThird(Sampler[int]):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(3)

        def __iter__(self):
            start = int(torch.randint(0, 3, (1,), generator=self.generator))
            return iter(range(start, len(texts), 3))

        def __len__(self) -> int:
            return len(texts) // 3

    sampler = EveryThird()
    state = sampler.generator.get_state()
    custom = BatchSource(DataLoader(texts, batch_size=4, sampler=sampler, collate_fn=pad_collate))
    (batch,) = custom.loader_batches(2, 1)
    assert len(batch[1]) == 2 and torch.equal(sampler.generator.get_state(), state)


def test_samples_that_only_the_collate_fn_turns_into_tensors_are_accepted(texts):
    source = BatchSource(text_loader(texts))  # lists of token ids: not tensors until collated
    tokens, labels = source.batch(3)
    assert tokens.shape == (3, 256) and labels.dtype == torch.int64
    with pytest.raises(TypeError, match="the collate_fn's batch of dataset\\[0\\]"):
        BatchSource(DataLoader(texts, collate_fn=lambda samples: [str(s) for s in samples]))


def test_a_tokenizer_style_batch_mapping_reaches_the_device_whole():
    from collections import UserDict

    class Encoding(UserDict):  # what a tokenizer's collator returns: a mapping, not a dict
        pass

    gpu = bf.SimulatedGPU("1MiB", allocator="ideal")
    moved = gpu.to_device(Encoding(input_ids=torch.zeros(2, 8, dtype=torch.long), labels=torch.zeros(2)))
    assert isinstance(moved, dict) and gpu.memory_allocated() == 2 * 512


def test_a_search_looks_further_for_a_rare_larger_sample_after_it_ran_and_searches_again():
    from batchfinder.training.sample_sizes import FIXED_CHECK_SAMPLES, _scan_order

    total = 20_000
    order = list(itertools.islice(_scan_order(total), PROBE_SAMPLES + FIXED_CHECK_SAMPLES + 200))
    rare = order[PROBE_SAMPLES + FIXED_CHECK_SAMPLES + 100]  # beyond what the scan looks at before the search

    class MostlySmall(Dataset):
        def __len__(self) -> int:
            return total

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(256 if index == rare else 16), 0

    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:  # pads to the longest, as text collates do
        width = max(len(x) for x, _ in batch)
        return torch.stack([F.pad(x, (0, width - len(x))) for x, _ in batch]), torch.tensor([y for _, y in batch])

    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2))
    loader = DataLoader(MostlySmall(), batch_size=8, collate_fn=collate)
    step = lambda m, batch: F.cross_entropy(m(F.pad(batch[0], (0, 256 - batch[0].shape[1]))), batch[1])  # noqa: E731
    result = bf.find_batch_size(model, loader, optimizer=torch.optim.SGD, step_fn=step, device=bf.SimulatedGPU("4MiB"))
    assert result.data_scan.varies and result.data_scan.largest_index == rare
    assert any("the search ran again on the largest samples" in note for note in result.notes)
    worst = bf.try_batch_size(model, loader, result.max_batch_size, optimizer=torch.optim.SGD, step_fn=step,
                              device=bf.SimulatedGPU("4MiB"))
    assert worst.fits and worst.data_scan.largest_index == rare  # every batch of the maximum fits, the rare one too
