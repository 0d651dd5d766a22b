"""The main job: the largest batch size the seeds' MNIST MLP can train with, and a safe one to use.

The model is the seeds' two-layer MLP (Flatten, Linear 784->128, ReLU, Linear 128->10, 101,770 parameters)
trained with Adam. MNIST is used when it is on disk (./data or $BATCHFINDER_DATA); otherwise torchvision's
FakeData with MNIST's shape stands in. On a machine with CUDA the search runs on the GPU; otherwise on a simulated
GPU of 64 MiB.

    python examples/mnist_mlp.py [--device cuda | sim:64MiB] [--mode binsearch|power]
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torchvision import datasets

import batchfinder as bf
from batchfinder.report import ProgressPrinter

from common import describe_device, load_dataset, parse_args


class MnistMLP(nn.Module):
    """The seeds' MNIST MLP: 784 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.layer1 = nn.Linear(28 * 28, 128)
        self.relu = nn.ReLU()
        self.layer2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.relu(self.layer1(self.flatten(x))))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_capacity="64MiB")
    torch.manual_seed(42)
    dataset, origin = load_dataset(datasets.MNIST, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), root=args.data_root)
    model = MnistMLP()
    device = bf.resolve_device(args.device)
    print(f"model:   seeds' MNIST MLP, {sum(p.numel() for p in model.parameters()):,} parameters, Adam")
    print(f"data:    {origin}")
    print(f"device:  {describe_device(device)}")
    print("trials (forward + backward + Adam step, 2 steps each):")
    result = bf.find_batch_size(
        model, dataset, optimizer=torch.optim.Adam, device=device, mode=args.mode, progress=ProgressPrinter(sys.stdout)
    )
    print()
    print(result)
    # The seeds' four parts of GPU memory at the recommended batch size: parameters + gradients, optimizer state,
    # the data batch, and the activations (estimated by tracing the same training step under fake tensors).
    print()
    print(f"where the memory goes at the recommended batch size {result.batch_size}:")
    print(bf.estimate_memory(model, dataset[0], result.batch_size, optimizer=torch.optim.Adam))


if __name__ == "__main__":
    main()
