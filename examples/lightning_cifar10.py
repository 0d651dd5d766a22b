"""The CIFAR-10 MLP as a LightningModule: BatchFinder picks its batch size, then a short training run uses it.

CIFAR-10 comes from disk (./data or $BATCHFINDER_DATA, torchvision's layout, never downloaded) when it is there,
otherwise torchvision's FakeData with CIFAR-10's shape. On CUDA when present; otherwise the search runs on a
simulated GPU (64 MiB by default) and so does the training run, so the memory the real training used can be
compared with the GPU's capacity.

    python examples/lightning_cifar10.py [--device cuda | sim:64MiB] [--max-steps 5] [--target-batch-size 4096]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import batchfinder as bf
from batchfinder.devices.resolve import resolve_device
from batchfinder.lightning import BatchFinder
from batchfinder.units import format_bytes

DATA_ROOT = os.environ.get("BATCHFINDER_DATA", os.path.join(os.path.dirname(__file__), "..", "data"))


class Cifar10MLP(pl.LightningModule):
    """The CIFAR-10 MLP (Flatten, Linear 3072 -> 128, ReLU, Linear 128 -> 10) with Adam."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Cifar10Data(pl.LightningDataModule):
    """CIFAR-10 from disk when present, FakeData of the same shape otherwise; the batch size lives in ``batch_size``."""

    def __init__(self, root: str = DATA_ROOT, batch_size: int = 32) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.origin = ""

    def setup(self, stage: str | None = None) -> None:
        to_tensor = transforms.ToTensor()
        try:
            self.train_set = datasets.CIFAR10(root=self.root, train=True, download=False, transform=to_tensor)
            self.val_set = datasets.CIFAR10(root=self.root, train=False, download=False, transform=to_tensor)
            self.origin = f"CIFAR-10 from {os.path.abspath(self.root)}"
        except (RuntimeError, OSError):
            self.train_set = datasets.FakeData(50_000, image_size=(3, 32, 32), num_classes=10, transform=to_tensor)
            self.val_set = datasets.FakeData(10_000, image_size=(3, 32, 32), num_classes=10, transform=to_tensor,
                                             random_offset=50_000)
            self.origin = f"FakeData with CIFAR-10's shape (CIFAR-10 is not on disk under {os.path.abspath(self.root)})"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class MeasureTraining(pl.Callback):
    """Runs the training itself (after the search) on the simulated GPU, so its peak memory can be reported."""

    def __init__(self, gpu: bf.SimulatedGPU) -> None:
        self.gpu = gpu
        self.active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gpu.__enter__()
        self.active = True
        self.gpu.reset_peak_memory_stats()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.gpu.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or sim:CAPACITY (default: CUDA if present, else sim:64MiB)")
    parser.add_argument("--data-root", default=DATA_ROOT, help="where CIFAR-10 would be (default: ./data)")
    parser.add_argument("--mode", default="binsearch", help="search mode: binsearch (default), power or guided")
    parser.add_argument("--max-steps", type=int, default=5, help="length of the training run after the search")
    parser.add_argument("--target-batch-size", type=int, default=None,
                        help="reach this effective batch size with gradient accumulation")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "sim:64MiB")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(42, verbose=False)

    model, data = Cifar10MLP(), Cifar10Data(root=args.data_root)
    simulated = resolve_device(device) if device.startswith("sim:") else None
    finder = BatchFinder(device=simulated, mode=args.mode, target_batch_size=args.target_batch_size)
    callbacks: list[pl.Callback] = [finder]
    if simulated is not None:
        callbacks.append(MeasureTraining(simulated))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as scratch:  # nothing is left on disk
        trainer = pl.Trainer(
            accelerator="cpu" if simulated is not None else "gpu",
            devices=1,
            max_steps=args.max_steps,
            limit_val_batches=1,
            val_check_interval=min(args.max_steps, 10),
            num_sanity_val_steps=0,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=scratch,
        )
        trainer.fit(model, datamodule=data)
    result = finder.result
    assert result is not None
    print(f"model:   CIFAR-10 MLP, {sum(p.numel() for p in model.parameters()):,} parameters, Adam")
    print(f"data:    {data.origin}")
    print(f"device:  {result.device}")
    print(result)
    print(f"training: {trainer.global_step} steps at batch size {data.batch_size}"
          f"{f' x {trainer.accumulate_grad_batches} accumulated' if trainer.accumulate_grad_batches > 1 else ''}, "
          f"validation loss {trainer.callback_metrics['val_loss']:.3f}")
    if simulated is not None:
        # The caching allocator holds whole segments: reserved bytes are what must fit in the GPU's capacity.
        peak, reserved = simulated.max_memory_allocated(), simulated.max_memory_reserved()
        capacity = simulated.capacity_bytes
        print(f"training peak memory: {format_bytes(peak)} allocated, {format_bytes(reserved)} reserved of "
              f"{format_bytes(capacity)} ({100 * reserved / capacity:.0f}% of the simulated GPU)")


if __name__ == "__main__":
    main()
