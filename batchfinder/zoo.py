"""Small built-in models: the MNIST and CIFAR-10 MLPs, for examples, benchmarks and the command line.

Each is a plain factory returning a fresh ``nn.Module``, so the command line can name it as
``batchfinder.zoo:mnist_mlp``::

    batchfinder estimate batchfinder.zoo:mnist_mlp --input 1x28x28 --batch-sizes 64,256,1024,4096 --optimizer sgd

* :func:`mnist_mlp`: Flatten, Linear 784 -> 128, ReLU, Linear 128 -> 10 (101,770 parameters); input 1x28x28.
* :func:`cifar10_mlp`: Flatten, Linear 3072 -> 128, ReLU, Linear 128 -> 10 (394,634 parameters); input 3x32x32.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mnist_mlp", "cifar10_mlp"]


def _mlp(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def mnist_mlp(hidden: int = 128, classes: int = 10) -> nn.Sequential:
    """The MNIST MLP: Flatten, Linear 784 -> 128, ReLU, Linear 128 -> 10 (101,770 parameters)."""
    return _mlp(1 * 28 * 28, hidden, classes)


def cifar10_mlp(hidden: int = 128, classes: int = 10) -> nn.Sequential:
    """The CIFAR-10 MLP: Flatten, Linear 3072 -> 128, ReLU, Linear 128 -> 10 (394,634 parameters)."""
    return _mlp(3 * 32 * 32, hidden, classes)
