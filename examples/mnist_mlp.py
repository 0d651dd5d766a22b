"""The main job: the largest batch size the MNIST MLP can train with, and a safe one to use.

The model is the two-layer MNIST MLP (Flatten, Linear 784->128, ReLU, Linear 128->10, 101,770 parameters)
trained with Adam. MNIST is used when it is on disk (./data or $BATCHFINDER_DATA); otherwise torchvision's
FakeData with MNIST's shape stands in. On a machine with CUDA the search runs on the GPU; otherwise on a simulated
GPU of 64 MiB. After the search it shows where the memory goes at the recommended batch size, in four
parts: parameters and gradients, optimizer state, the data batch, and activations.

    python examples/mnist_mlp.py [--device cuda | sim:64MiB] [--mode binsearch|power|guided]
"""

from __future__ import annotations

import torch
from common import load_dataset, parse_args, search_and_report
from torchvision import datasets

from batchfinder.zoo import mnist_mlp


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_capacity="64MiB")
    torch.manual_seed(42)
    dataset, origin = load_dataset(datasets.MNIST, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), root=args.data_root)
    search_and_report("MNIST MLP", mnist_mlp(), dataset, origin, args)


if __name__ == "__main__":
    main()
