"""The CIFAR-10 MLP (3072 -> 128 -> 10, 394,634 parameters) with Adam: its largest and recommended batch size.

CIFAR-10 is used when it is on disk (./data or $BATCHFINDER_DATA); otherwise torchvision's FakeData with
CIFAR-10's shape. On CUDA when present, otherwise on a simulated GPU of 256 MiB.

    python examples/cifar10_mlp.py [--device cuda | sim:256MiB] [--mode binsearch|power|guided]
"""

from __future__ import annotations

import torch
from common import load_dataset, parse_args, search_and_report
from torchvision import datasets

from batchfinder.zoo import cifar10_mlp


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_capacity="256MiB")
    torch.manual_seed(42)
    dataset, origin = load_dataset(
        datasets.CIFAR10, shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), root=args.data_root
    )
    search_and_report("CIFAR-10 MLP", cifar10_mlp(), dataset, origin, args)


if __name__ == "__main__":
    main()
