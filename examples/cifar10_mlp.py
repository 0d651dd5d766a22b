"""The seeds' CIFAR-10 MLP (3072 -> 128 -> 10, 394,634 parameters) with Adam: its largest and recommended batch size.

CIFAR-10 is used when it is on disk (./data or $BATCHFINDER_DATA); otherwise torchvision's FakeData with
CIFAR-10's shape. On CUDA when present, otherwise on a simulated GPU of 256 MiB.

    python examples/cifar10_mlp.py [--device cuda | sim:256MiB] [--mode binsearch|power]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torchvision import datasets

import batchfinder as bf
from batchfinder.report import ProgressPrinter

from common import describe_device, load_dataset, parse_args


class Cifar10MLP(nn.Module):
    """The seeds' CIFAR-10 MLP: 3072 -> 128 -> 10."""

    def __init__(self, input_size: int = 3 * 32 * 32, hidden_size: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_capacity="256MiB")
    torch.manual_seed(42)
    dataset, origin = load_dataset(
        datasets.CIFAR10, shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), root=args.data_root
    )
    model = Cifar10MLP()
    device = bf.resolve_device(args.device)
    print(f"model:   seeds' CIFAR-10 MLP, {sum(p.numel() for p in model.parameters()):,} parameters, Adam")
    print(f"data:    {origin}")
    print(f"device:  {describe_device(device)}")
    print("trials (forward + backward + Adam step, 2 steps each):")
    result = bf.find_batch_size(
        model, dataset, optimizer=torch.optim.Adam, device=device, mode=args.mode, progress=ProgressPrinter(sys.stdout)
    )
    print()
    print(result)


if __name__ == "__main__":
    main()
