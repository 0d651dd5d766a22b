"""The Lightning callback on variable-size data: trials run on the largest samples of every loader.

The data: token sequences whose length grows with the index (the first samples are the shortest), padded to the
longest of each batch by the loader's ``collate_fn``, shuffled. A search on the first samples would find a batch size
that a shuffled epoch soon breaks; the callback's trials use the largest samples (training and validation loaders),
so its size is what ``bf.try_batch_size`` says of the worst case, and a whole epoch at it fits.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("pytorch_lightning")

import batchfinder as bf  # noqa: E402
from batchfinder.lightning import BatchFinder  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*litlogger.*")

CAPACITY = "2MiB"
SAMPLES, VOCAB, CLASSES = 256, 50, 5
SHORTEST, LONGEST = 4, 96

SEEN: dict[str, list[int]] = {"train": [], "val": []}
"""Widths of the padded batches each step saw. Kept outside the module: the trials restore the module's attributes."""


def token_samples(count: int = SAMPLES, shortest: int = SHORTEST, longest: int = LONGEST) -> list[tuple[list[int], int]]:
    """``(token ids, label)`` pairs, lengths growing with the index from ``shortest`` to ``longest``."""
    generator = torch.Generator().manual_seed(0)
    data = []
    for index in range(count):
        length = shortest + (index * (longest - shortest)) // (count - 1)
        data.append((torch.randint(1, VOCAB, (length,), generator=generator).tolist(), index % CLASSES))
    return data


def pad(samples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the token ids to the longest sample of the batch (0 is the padding id)."""
    tokens, labels = zip(*samples)
    batch = torch.zeros(len(tokens), max(len(t) for t in tokens), dtype=torch.long)
    for row, ids in enumerate(tokens):
        batch[row, : len(ids)] = torch.tensor(ids)
    return batch, torch.tensor(labels)


def loader(data: list[Any], batch_size: int = 4, shuffle: bool = True) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=pad)


class TokenNet(nn.Module):
    """Embedding, a per-token hidden layer, mean over the tokens, classifier: activations grow with batch x length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 64)
        self.out = nn.Linear(64, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(tokens))).mean(dim=1))


def token_net() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet()


class TokenClassifier(pl.LightningModule):
    def __init__(self, batch_size: int = 4, validation: list[Any] | None = None, eval_batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.net = token_net()
        self.data = token_samples()
        self.validation = validation

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        SEEN["train"].append(tokens.shape[1])
        return nn.functional.cross_entropy(self.net(tokens), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        tokens, labels = batch
        SEEN["val"].append(tokens.shape[1])
        self.log("val_loss", nn.functional.cross_entropy(self.net(tokens), labels))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return loader(self.data, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return loader(self.validation or [], self.eval_batch_size, shuffle=False)


class TrainOnly(TokenClassifier):
    validation_step = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, logger=False, default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def search(tmp_path: Path, module: pl.LightningModule, **kwargs: Any) -> bf.SearchResult:
    kwargs.setdefault("device", bf.SimulatedGPU(CAPACITY))
    callback = BatchFinder(**kwargs)
    for seen in SEEN.values():
        seen.clear()
    trainer(tmp_path, [callback]).fit(module)
    assert callback.result is not None
    return callback.result


def one_epoch(tmp_path: Path, module: pl.LightningModule, **kwargs: Any) -> None:
    """A whole shuffled epoch (and validation) on a fresh simulated GPU of the search's capacity."""
    for seen in SEEN.values():
        seen.clear()
    with bf.SimulatedGPU(CAPACITY):
        trainer(tmp_path, [], max_steps=-1, max_epochs=1, **kwargs).fit(module)


# -- training ---------------------------------------------------------------------------------------------------------
def test_training_searches_the_largest_samples_and_an_epoch_fits(tmp_path: Path) -> None:
    module = TrainOnly()
    result = search(tmp_path, module)
    scan = result.data_scan
    assert scan is not None and scan.varies and scan.complete
    assert scan.largest_index == SAMPLES - 1 and scan.largest_size == LONGEST + 1  # the tokens and the label
    assert "data: scanned 256 of 256 samples" in str(result)
    assert result.smallest_failure == result.max_batch_size + 1
    # Every trial's batch is the longest samples; the confirmation runs 2 batches in the loader's order, then the
    # longest samples; then training starts (1 step).
    trials, confirmation, training = SEEN["train"][:-4], SEEN["train"][-4:-1], SEEN["train"][-1:]
    assert len(trials) >= result.num_trials and set(trials) == {LONGEST} and confirmation[-1] == LONGEST
    assert result.confirmations[-1].batch_size == result.batch_size and len(training) == 1
    assert module.batch_size == result.batch_size

    # The same worst case through the function front end, on the same data: max fits, max + 1 does not.
    data = loader(token_samples())
    fits = bf.try_batch_size(token_net(), data, result.max_batch_size, device=bf.SimulatedGPU(CAPACITY))
    fails = bf.try_batch_size(token_net(), data, result.max_batch_size + 1, device=bf.SimulatedGPU(CAPACITY))
    assert fits.fits and not fails.fits
    assert fits.peak_bytes == result.trial_for(result.max_batch_size).peak_bytes

    # A search on the first (shortest) samples, as without the scan, would allow far more than survives an epoch.
    naive = bf.try_batch_size(
        token_net(), data, 2 * result.max_batch_size, device=bf.SimulatedGPU(CAPACITY), sample_size=[1] * SAMPLES
    )
    assert naive.fits and naive.data_scan is not None and not naive.data_scan.varies
    with pytest.raises(torch.OutOfMemoryError):
        one_epoch(tmp_path, TrainOnly(batch_size=2 * result.max_batch_size))

    one_epoch(tmp_path, TrainOnly(batch_size=result.batch_size))  # the applied size: the whole epoch fits
    assert max(SEEN["train"]) == LONGEST and len(SEEN["train"]) == -(-SAMPLES // result.batch_size)


def test_sample_size_list_is_used(tmp_path: Path) -> None:
    lengths = [len(tokens) for tokens, _ in token_samples()]
    result = search(tmp_path, TrainOnly(), sample_size=lengths)
    assert result.data_scan is not None and result.data_scan.measure == "sample_size"
    assert result.data_scan.largest_size == LONGEST and result.data_scan.largest_index == SAMPLES - 1
    worst = result.max_batch_size
    # Sizes that call the first samples the largest: the trials then run on those (short) samples.
    upside_down = search(tmp_path, TrainOnly(), sample_size=lengths[::-1], confirm_steps=0)
    assert upside_down.data_scan is not None and upside_down.data_scan.largest_index == 0
    assert upside_down.max_batch_size > 2 * worst


def test_combined_training_loaders(tmp_path: Path) -> None:
    class TwoLoaders(TrainOnly):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return sum(super(TwoLoaders, self).training_step(part, batch_idx) for part in batch.values())

        def train_dataloader(self) -> Any:
            return {"text": loader(self.data, self.batch_size), "short": loader(token_samples(64, 8, 8), self.batch_size)}

    lengths = [len(tokens) for tokens, _ in token_samples()]
    result = search(tmp_path, TwoLoaders(), sample_size={"text": lengths})
    assert result.data_scan is not None and result.data_scan.varies and result.data_scan.measure == "sample_size"
    assert result.confirmations and result.confirmations[-1].fits
    with pytest.raises(ValueError, match="not training dataloaders"):
        search(tmp_path, TwoLoaders(), sample_size={"speech": lengths})
    with pytest.raises(ValueError, match="dict keyed like the dict of dataloaders"):
        search(tmp_path, TwoLoaders(), sample_size=lengths)


# -- validation -------------------------------------------------------------------------------------------------------
def test_validation_loader_is_searched_worst_case(tmp_path: Path) -> None:
    validation = token_samples(128, 8, 160)  # longer than the training samples, shortest first, not shuffled
    module = TokenClassifier(validation=validation)
    result = search(tmp_path, module, eval_batch_size=True, confirm_steps=0)
    evaluation = result.evaluation
    assert evaluation is not None and evaluation.data_scan is not None and evaluation.data_scan.varies
    assert evaluation.data_scan.largest_index == 127 and evaluation.data_scan.total == 128
    assert set(SEEN["val"]) == {160}  # validation inside every training trial and every evaluation trial
    assert evaluation.smallest_failure == evaluation.max_batch_size + 1
    assert module.eval_batch_size == result.eval_batch_size and module.batch_size == result.batch_size

    fresh = TokenClassifier(batch_size=result.batch_size, validation=validation, eval_batch_size=result.eval_batch_size)
    one_epoch(tmp_path, fresh, limit_train_batches=4)  # validation over the whole loader, longest batches included
    assert max(SEEN["val"]) == 160 and len(SEEN["val"]) == -(-128 // result.eval_batch_size)


def test_validate_stage_reports_the_scan(tmp_path: Path) -> None:
    module = TokenClassifier(validation=token_samples(64, 8, 160))
    callback = BatchFinder(device=bf.SimulatedGPU(CAPACITY), stages="validate", eval_batch_size=True)
    trainer(tmp_path, [callback]).validate(module, verbose=False)
    result = callback.results["validate"]
    assert result.data_scan is not None and result.data_scan.varies and result.data_scan.largest_index == 63
    assert "data: scanned 64 of 64 samples" in str(result)


# -- bad options ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"scan_budget": 0}, ValueError, "scan_budget=0 must be a positive"),
        ({"scan_budget": -1.5}, ValueError, "scan_budget=-1.5"),
        ({"scan_budget": "10"}, TypeError, "scan_budget must be a number"),
        ({"scan_budget": True}, TypeError, "scan_budget must be a number"),
        ({"sample_size": "long"}, TypeError, "sample_size must be a callable"),
        ({"sample_size": 7}, TypeError, "sample_size must be a callable"),
        ({"sample_size": ["a", "b"]}, TypeError, "sample_size must hold one number per sample"),
        ({"sample_size": {"text": None}}, TypeError, r"sample_size\['text'\] must be"),
        ({"sample_size": {}}, ValueError, "names no training dataloader"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BatchFinder(device=bf.SimulatedGPU(CAPACITY), **options)


def test_sample_size_that_does_not_fit_the_data_is_refused_before_any_trial(tmp_path: Path) -> None:
    for sample_size, match in (([5] * 10, "has 10 entries but the data set has 256"), ({"text": [1] * SAMPLES}, "one training dataloader")):
        module = TrainOnly()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        SEEN["train"].clear()
        with pytest.raises(ValueError, match=match):
            trainer(tmp_path, [BatchFinder(device=bf.SimulatedGPU(CAPACITY), sample_size=sample_size)]).fit(module)
        assert SEEN["train"] == [] and module.batch_size == 4
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# -- precision ----------------------------------------------------------------------------------------------------------
class SoftmaxDtype(TrainOnly):
    """Records the dtype softmax returns in its training steps (float32 under CUDA's autocast, bfloat16 under the
    CPU's)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        logits = self.net(tokens)
        SEEN.setdefault("softmax", []).append(torch.softmax(logits, -1).dtype)
        return nn.functional.cross_entropy(logits, labels)


def test_the_trainers_mixed_precision_follows_cudas_autocast_on_a_simulated_gpu(tmp_path: Path) -> None:
    module = SoftmaxDtype()
    callback = BatchFinder(device=bf.SimulatedGPU(CAPACITY), confirm_steps=0, max_trials=3)
    SEEN["softmax"] = []
    trainer(tmp_path, [callback], precision="bf16-mixed").fit(module)
    searched, trained = SEEN["softmax"][:-1], SEEN["softmax"][-1]
    assert searched and set(searched) == {torch.float32}  # the search: CUDA's policy, as on the GPU it stands for
    assert trained == torch.bfloat16  # the trainer's own CPU step afterwards: the CPU's policy, untouched
