"""Shared test models, data sets and helpers: one definition of each, imported by the tests that use it.

``make_case`` builds the four model shapes many tests run (an MLP, a CNN with BatchNorm, a dict-input model with its
own loss, a partly frozen model); ``snapshot``/``assert_unchanged`` compare a model's (and an optimizer's) whole
state before and after a call. The rest are the small models, data sets and stand-ins that several test files share.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import socket
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset, TensorDataset

GiB = 2**30

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
"""For tests that run on a real GPU (mark them ``cuda`` too, so that ``pytest -m cuda`` selects them)."""


# -- the four model shapes -------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class DictLossModel(nn.Module):
    """Takes dict samples as keyword arguments and returns its own loss, like Hugging Face models."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        logits = self.proj(hidden)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


class PartlyFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(48, 128), nn.Tanh(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 3)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)))


class DictDataset(Dataset):
    def __init__(self, n: int = 512, length: int = 12, vocab: int = 50) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "attention_mask": torch.ones(self.ids.shape[1])}


@dataclass
class Case:
    name: str
    model: nn.Module
    dataset: Any


def make_case(name: str) -> Case:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return Case(name, MLP(), TensorDataset(torch.randn(4000, 1, 8, 8, generator=g), torch.randint(0, 10, (4000,), generator=g)))
    if name == "cnn":
        return Case(name, SmallCNN(), TensorDataset(torch.randn(600, 3, 16, 16, generator=g), torch.randint(0, 5, (600,), generator=g)))
    if name == "dict":
        return Case(name, DictLossModel(), DictDataset(1500))
    if name == "frozen":
        return Case(name, PartlyFrozen(), TensorDataset(torch.randn(3000, 48, generator=g), torch.randint(0, 3, (3000,), generator=g)))
    raise KeyError(name)


# -- further shared models ---------------------------------------------------------------------------------------------
class TinyTransformer(nn.Module):
    """A small Transformer encoder over token ids: embedding, ``layers`` encoder layers, mean over the tokens, head.

    The defaults are the replay tests' model; the other tests pass their own sizes (the parameters are created in
    the same order whatever the sizes, so that a seeded model is the same one).
    """

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2,
                 classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class Deep(nn.Module):
    """Four wide blocks; with ``checkpointing`` each block's activations are recomputed in the backward pass."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)) for _ in range(4))
        self.head = nn.Linear(64, 10)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing == "non-reentrant":
                x = x + checkpoint(block, x, use_reentrant=False)
            elif self.checkpointing == "reentrant":
                x = x + checkpoint(block, x, use_reentrant=True)
            else:
                x = x + block(x)
        return self.head(x)


class WideOutput(nn.Module):
    """A tiny model whose output per sample (600,000 x 2 floats, 9.2 MiB) is what runs out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unsqueeze(1).expand(-1, 600_000, -1).contiguous()


def small_mlp() -> nn.Module:
    """An MLP over 8x8 single-channel images (seeded): 64 -> 96 -> 10."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def batchnorm_mlp() -> nn.Module:
    """An MLP with BatchNorm over 8x8 single-channel images (seeded): 64 -> 256 -> 10."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def classification_data(n: int, sample_shape: tuple[int, ...], classes: int, seed: int = 0) -> TensorDataset:
    """``n`` random samples of ``sample_shape`` with integer labels in ``[0, classes)``, from a generator seeded with
    ``seed`` (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *sample_shape, generator=g), torch.randint(0, classes, (n,), generator=g))


# -- processes and ports -----------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as rank ``rank`` of a gloo group of ``world`` on ``port`` (one torch thread), for the block."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Any, world: int, *args: Any, timeout_s: float = 240.0) -> dict[int, Any]:
    """Run ``worker(rank, world, port, queue, *args)`` on ``world`` spawned processes, all joined within ``timeout_s``
    (a rank still alive then is killed and fails the test); returns what each rank put in the queue as
    ``(rank, value)``. A rank that put a traceback there fails the test with it."""
    import time

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(target=worker, args=(rank, world, port, queue, *args), daemon=True) for rank in range(world)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join(10)
    assert not hung, "a rank hung: it waited on a collective the other rank never entered"
    results: dict[int, Any] = {}
    while not queue.empty():
        rank, value = queue.get()
        results[rank] = value
    for rank, value in results.items():
        assert not (isinstance(value, str) and value.startswith("Traceback")), f"rank {rank} failed:\n{value}"
    assert sorted(results) == list(range(world))
    return results


def as_lightning_rank(rank: int, world: int, port: int) -> None:
    """Make this (spawned) process one rank of Lightning's ``strategy="ddp"`` on the CPU, as torchrun would: Lightning
    sees ``LOCAL_RANK`` and launches nothing. One intra-op thread (the ranks share the cores); warnings silenced."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    warnings.filterwarnings("ignore")


# -- a CUDA GPU on the CPU ----------------------------------------------------------------------------------------------
# -- what a guided search leaves behind ---------------------------------------------------------------------------------
def alive(refs: list[weakref.ref]) -> int:
    """How many of ``refs`` still point at a live object, after a full garbage collection."""
    gc.collect()
    return sum(ref() is not None for ref in refs)


def three_guided_searches() -> None:
    """Three guided searches of one model on one data set, each with a prediction; nothing of them is kept."""
    import batchfinder as bf

    dataset = classification_data(4000, (1, 8, 8), 10)
    model = small_mlp()
    for _ in range(3):
        result = bf.find_batch_size(model, dataset, device=bf.SimulatedGPU("8MiB"), mode="guided")
        assert result.predicted_peaks and result.num_trials >= 1


# -- state snapshots ------------------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    tensors: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    modes: list[bool]
    requires_grad: list[bool]
    optimizer: Any
    rng: tuple[Any, ...]
    identities: list[int]
    cuda_rng: list[torch.Tensor] | None = None
    """Every CUDA generator's state, when CUDA is initialised (reading it otherwise would initialise CUDA)."""


def _cuda_rng_states() -> list[torch.Tensor] | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [state.clone() for state in torch.cuda.get_rng_state_all()]
    return None


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
    return Snapshot(
        tensors={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        modes=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        optimizer=None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        rng=(torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()),
        identities=[id(p) for p in model.parameters()],
        cuda_rng=_cuda_rng_states(),
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return a == b


def assert_unchanged(before: Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    after = snapshot(model, optimizer)
    for key, value in before.tensors.items():
        assert _equal(value, after.tensors[key]), f"{key} changed"
    assert before.tensors.keys() == after.tensors.keys()
    for key, value in before.grads.items():
        assert _equal(value, after.grads[key]), f"gradient of {key} changed"
    assert before.modes == after.modes, "train/eval mode changed"
    assert before.requires_grad == after.requires_grad
    assert _equal(before.optimizer, after.optimizer), "optimizer state changed"
    assert torch.equal(before.rng[0], after.rng[0]), "torch RNG changed"
    assert before.rng[1] == after.rng[1], "python RNG changed"
    assert np.array_equal(before.rng[2], after.rng[2]), "numpy RNG changed"
    # CUDA first initialised during the search has no earlier state to compare with (nor could the search restore
    # one); a test that cares initialises CUDA before its snapshot.
    if before.cuda_rng is not None:
        assert after.cuda_rng is not None and _equal(before.cuda_rng, after.cuda_rng), "CUDA RNG changed"
    assert before.identities == after.identities
