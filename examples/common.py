"""Shared plumbing for the example scripts: pick a device, load a dataset or its FakeData stand-in."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torchvision import datasets, transforms

import batchfinder as bf
from batchfinder.devices.base import DeviceBackend
from batchfinder.devices.resolve import resolve_device
from batchfinder.report import ProgressPrinter
from batchfinder.units import format_bytes

DATA_ROOT = os.environ.get("BATCHFINDER_DATA", os.path.join(os.path.dirname(__file__), "..", "data"))


def load_dataset(
    loader: Callable[..., Any], *, shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...], root: str
) -> tuple[Any, str]:
    """The real training set when it is on disk under ``root``, otherwise torchvision's FakeData of the same shape."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        dataset = loader(root=root, train=True, download=False, transform=transform)
        return dataset, f"{loader.__name__} from {os.path.abspath(root)} ({len(dataset):,} images)"
    except (RuntimeError, OSError):
        size = 60_000 if loader is datasets.MNIST else 50_000
        fake = datasets.FakeData(size=size, image_size=shape, num_classes=10, transform=transform)
        return fake, (
            f"FakeData with {loader.__name__}'s shape {shape} ({size:,} images; {loader.__name__} is not on disk "
            f"under {os.path.abspath(root)})"
        )


def parse_args(description: str, default_capacity: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default=None, help="cuda, cuda:N or sim:CAPACITY (default: CUDA if present, "
                        f"otherwise a simulated GPU of {default_capacity})")
    parser.add_argument("--mode", default="binsearch", help="search mode: binsearch, power or guided")
    parser.add_argument("--data-root", default=DATA_ROOT, help="where the real dataset would be (default: ./data)")
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else f"sim:{default_capacity}"
    return args


def describe_device(device: DeviceBackend) -> str:
    if isinstance(device, bf.SimulatedGPU):
        return (
            f"{device.name}: no CUDA GPU here, so a GPU with {format_bytes(device.capacity_bytes)} of memory is "
            "simulated on the CPU (real computation; memory charged as the GPU would hold it)"
        )
    return f"{device.name} ({format_bytes(device.capacity_bytes)})"


def search_and_report(label: str, model: torch.nn.Module, dataset: Any, origin: str, args: argparse.Namespace) -> None:
    """Search the batch size with Adam, showing each trial, the table, the recommendation and where memory goes."""
    device = resolve_device(args.device)
    print(f"model:   {label}, {sum(p.numel() for p in model.parameters()):,} parameters, Adam")
    print(f"data:    {origin}")
    print(f"device:  {describe_device(device)}")
    print("trials (forward + backward + Adam step, 2 steps each):")
    result = bf.find_batch_size(
        model, dataset, optimizer=torch.optim.Adam, device=device, mode=args.mode, progress=ProgressPrinter(sys.stdout)
    )
    print()
    print(result)
    # The four parts of GPU memory at the recommended batch size: parameters + gradients, optimizer state,
    # the data batch, and the activations (estimated by tracing the same training step under fake tensors).
    print()
    print(f"where the memory goes at the recommended batch size {result.batch_size}:")
    print(bf.estimate_memory(model, dataset[0], result.batch_size, optimizer=torch.optim.Adam))
