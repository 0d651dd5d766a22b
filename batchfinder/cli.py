"""The ``batchfinder`` command: estimate memory, predict the largest batch size, or find it with real trials.

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets its handler; to add a
subcommand, write such a function and append it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .oom import exception_first_line

__all__ = ["main", "build_parser", "load_model", "SUBCOMMANDS"]

_DESCRIPTION = "Find the batch size a PyTorch model can train with on a GPU."
"""The top of ``batchfinder --help``; the commands are listed under it from each subparser's ``help``."""

_EPILOG = """\
MODEL is package.module:callable (called with no arguments, or with --model-kwargs), a file
path/to/models.py:callable, or torchvision:NAME (a torchvision model, e.g. torchvision:resnet18).
Built-in models: batchfinder.zoo:mnist_mlp (input 1x28x28) and batchfinder.zoo:cifar10_mlp (3x32x32).

examples:
  batchfinder estimate batchfinder.zoo:mnist_mlp --input 1x28x28 --batch-sizes 64,256,1024,4096 --optimizer sgd
  batchfinder predict torchvision:resnet18 --input 3x224x224 --gpu A100-40GB
  batchfinder find batchfinder.zoo:mnist_mlp --input 1x28x28 --device sim:64MiB --mode guided --plot search.png

Run batchfinder COMMAND --help for the options of a command.
"""

_DATA_NOTE = """\
find trains on synthetic data: inputs of the --input shape (standard normal; zeros for integer --dtype) and
targets made to suit the model's output: for an output of shape (N, C, ...) integer class labels in [0, C)
(cross-entropy), for (N,) or (N, 1) float targets (mean squared error), none when the model returns a scalar. The
dataset has --samples samples, the largest batch size the search may try.
"""


# -- shared helpers -----------------------------------------------------------------------------------------------
class CommandError(Exception):
    """A problem with the command line that is not argparse's (a model that does not load, ...)."""


def load_model(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Build the model named by ``spec`` (``package.module:callable``, ``path/file.py:callable`` or
    ``torchvision:NAME``), calling it with ``kwargs``."""
    from torch import nn

    if ":" not in spec:
        raise CommandError(
            f"MODEL {spec!r} must be package.module:callable (e.g. batchfinder.zoo:mnist_mlp), path/to/file.py:callable "
            "or torchvision:NAME (e.g. torchvision:resnet18)"
        )
    where, name = spec.rsplit(":", 1)
    kwargs = kwargs or {}
    if where == "torchvision":
        try:
            import torchvision.models
        except ImportError as exc:
            raise CommandError("torchvision:NAME needs torchvision: pip install 'batchfinder[vision]'") from exc
        try:
            factory: Any = torchvision.models.get_model_builder(name)
        except ValueError as exc:
            raise CommandError(f"torchvision has no model {name!r} ({exception_first_line(exc)})") from exc
    else:
        module = _import(where)
        factory = module
        for part in name.split("."):
            if not hasattr(factory, part):
                raise CommandError(f"{where} has no attribute {name!r}")
            factory = getattr(factory, part)
    model = factory if isinstance(factory, nn.Module) else None
    if model is None:
        if not callable(factory):
            raise CommandError(f"{spec} is a {type(factory).__name__}, not a model or a callable that returns one")
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise CommandError(f"calling {spec} failed: {exception_first_line(exc)} (pass arguments with --model-kwargs '{{\"name\": value}}')") from exc
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(where: str) -> Any:
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise CommandError(f"no such file: {where}")
        name = os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise CommandError(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory on the path
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise CommandError(f"cannot import {where!r}: {exception_first_line(exc)}") from exc


def _optimizer(name: str) -> Any:
    import torch

    classes = {
        key.lower(): value
        for key, value in vars(torch.optim).items()
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer
    }
    found = classes.get(name.lower().replace("-", "").replace("_", ""))
    if found is None:
        raise CommandError(f"--optimizer {name!r} is not a torch.optim optimizer; choose one of {', '.join(sorted(classes))}")
    return found


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes, e.g. 64,256,1024")
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be whole numbers of at least 1")
    return sizes


def _shape(text: str) -> tuple[int, ...]:
    from .synthetic import parse_shape

    try:
        return parse_shape(text, argument="--input")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--model-kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({exc})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="package.module:callable, path/file.py:callable or torchvision:NAME")
    parser.add_argument(
        "--input", required=True, type=_shape, metavar="SHAPE", help="shape of one input sample without the batch dimension, e.g. 1x28x28"
    )
    parser.add_argument(
        "--dtype", default="float32", help="dtype of the input: float32 (default), float16, bfloat16, int64 (token ids), ..."
    )
    parser.add_argument("--optimizer", default="adam", help="a torch.optim optimizer by name: adam (default), sgd, adamw, ...")
    parser.add_argument("--model-kwargs", type=_kwargs, default=None, metavar="JSON", help="keyword arguments for MODEL, as a JSON object")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--plot", metavar="PNG", default=None, help="also write a plot to this PNG file")


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, optimizer class, input dtype) from the shared arguments."""
    from .synthetic import DTYPES

    dtype = DTYPES.get(args.dtype.lower())
    if dtype is None:
        raise CommandError(f"--dtype {args.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    return load_model(args.model, args.model_kwargs), _optimizer(args.optimizer), dtype


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


# -- estimate -----------------------------------------------------------------------------------------------------
def add_estimate(subparsers: Any) -> None:
    """``batchfinder estimate``: memory at given batch sizes."""
    parser = subparsers.add_parser(
        "estimate",
        help="memory of a training step at given batch sizes (fake tensors, no GPU needed)",
        description="Estimate the GPU memory of training MODEL at each batch size, by category (parameters and "
        "gradients, optimizer state, the data batch, activations), tracing two real training steps under fake "
        "tensors on the CPU. Each storage is rounded up to 512 B as the CUDA allocator does.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  batchfinder estimate batchfinder.zoo:mnist_mlp --input 1x28x28 --batch-sizes 64,256,1024,4096 --optimizer sgd",
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[64, 256, 1024, 4096], metavar="B1,B2,...", help="batch sizes (default 64,256,1024,4096)"
    )
    parser.add_argument("--capacity", default=None, help="draw this capacity (e.g. 16GiB) on the --plot")
    parser.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the estimates at ``--batch-sizes`` (a table, or one estimate's breakdown), optionally plot them."""
    from .estimate import estimate_memory_curve

    model, optimizer, dtype = _prepare(args)
    estimates = estimate_memory_curve(model, args.input, list(args.batch_sizes), optimizer=optimizer, input_dtype=dtype)
    if args.plot:
        estimates.plot(args.plot, capacity=args.capacity)
    text = str(estimates)
    if len(estimates) == 1:
        text = str(estimates[0])
    _emit(args, {"estimates": estimates.as_dicts(), "plot": args.plot}, text + (f"\nplot written to {args.plot}" if args.plot else ""))
    return 0


# -- predict ------------------------------------------------------------------------------------------------------
def add_predict(subparsers: Any) -> None:
    """``batchfinder predict``: the largest batch size predicted to fit."""
    from .gpus import known_gpu_names

    parser = subparsers.add_parser(
        "predict",
        help="the largest batch size predicted to fit on a GPU or in a capacity (no GPU needed)",
        description="Predict the largest batch size MODEL can train with on a GPU (its memory minus an allowance for "
        "the CUDA context and cuBLAS workspace) or in a capacity, from fake-tensor traces on the CPU, and the "
        "recommended batch size after the safety factor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="known GPUs: " + ", ".join(known_gpu_names()) + "\n\nexample:\n  batchfinder predict torchvision:resnet18 --input 3x224x224 --gpu A100-40GB",
    )
    _add_model_arguments(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpu", help="a GPU name, e.g. T4, A100-40GB, H100 (case and format do not matter)")
    where.add_argument("--capacity", help="bytes the tensors may take, e.g. 16GiB (as a simulated GPU's capacity)")
    parser.add_argument("--safety", type=float, default=0.8, help="recommend floor(SAFETY x largest) (default 0.8)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="largest batch size considered")
    parser.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from .predict import predict_max_batch_size

    model, optimizer, dtype = _prepare(args)
    prediction = predict_max_batch_size(
        model,
        args.input,
        capacity=args.capacity,
        gpu=args.gpu,
        optimizer=optimizer,
        safety=args.safety,
        max_batch_size=args.max_batch_size,
        input_dtype=dtype,
    )
    if args.plot:
        prediction.plot(args.plot)
    _emit(args, {**prediction.as_dict(), "plot": args.plot}, str(prediction) + (f"\nplot written to {args.plot}" if args.plot else ""))
    return 0


# -- find ---------------------------------------------------------------------------------------------------------
def add_find(subparsers: Any) -> None:
    """``batchfinder find``: the largest batch size that fits, by real trials."""
    parser = subparsers.add_parser(
        "find",
        help="the largest batch size that fits, by running real training steps (a GPU, or sim:SIZE)",
        description="Find the largest batch size MODEL can train with by running real training steps (forward, "
        "backward, optimizer step) on a CUDA GPU, or on a simulated GPU of a given size on the CPU.\n\n" + _DATA_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  batchfinder find batchfinder.zoo:mnist_mlp --input 1x28x28 --device sim:64MiB --mode guided --plot search.png",
    )
    _add_model_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:N, or sim:SIZE for a simulated GPU (e.g. sim:64MiB); default cuda")
    parser.add_argument("--mode", default="binsearch", help="search mode: binsearch (default), power or guided")
    parser.add_argument("--samples", type=int, default=65536, help="size of the synthetic dataset: the largest batch size tried (default 65536)")
    parser.add_argument("--safety", type=float, default=0.8, help="recommend floor(SAFETY x largest) (default 0.8)")
    parser.add_argument("--max-trials", type=int, default=None, help="stop after this many trials")
    parser.add_argument("--progress", action="store_true", help="print a line per trial to standard error")
    parser.set_defaults(handler=run_find)


def run_find(args: argparse.Namespace) -> int:
    import torch

    from .engine import find_batch_size
    from .synthetic import target_for_shape
    from .synthetic import SyntheticDataset

    model, optimizer, dtype = _prepare(args)
    if args.samples < 1:
        raise CommandError("--samples must be at least 1")
    device = args.device
    if device is None:
        if not torch.cuda.is_available():
            raise CommandError("no CUDA GPU here: pass --device sim:SIZE (e.g. sim:16GiB) to search on a simulated GPU")
        device = "cuda"
    target = target_for_shape(model, args.input, dtype)
    dataset = SyntheticDataset(args.input, args.samples, target=target, dtype=dtype)
    result = find_batch_size(
        model,
        dataset,
        optimizer=optimizer,
        device=device,
        mode=args.mode,
        safety=args.safety,
        max_trials=args.max_trials,
        progress=args.progress,
    )
    if args.plot:
        result.plot(args.plot)
    data = {**result.as_dict(), "targets": None if target is None else target.describe(), "plot": args.plot}
    described = "none" if target is None else target.describe()
    text = f"synthetic data: {args.samples:,} samples of shape {args.input}, targets: {described}\n{result}"
    _emit(args, data, text + (f"\nplot written to {args.plot}" if args.plot else ""))
    return 0


# -- gpus ---------------------------------------------------------------------------------------------------------
def add_gpus(subparsers: Any) -> None:
    """``batchfinder gpus``: what the NVIDIA driver reports (through NVML)."""
    parser = subparsers.add_parser(
        "gpus",
        help="the NVIDIA GPUs the driver reports: name, memory total and used (all processes), versions",
        description="List the NVIDIA GPUs as the driver reports them through NVML: name, total memory, memory "
        "used by every process (this one and others), free memory, driver and CUDA versions. Says so when "
        "there is no NVIDIA driver or GPU.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=run_gpus)


def run_gpus(args: argparse.Namespace) -> int:
    from . import nvml

    report = nvml.query()
    _emit(args, report.to_dict(), nvml.format_report(report))
    return 0


# -- entry point --------------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[Any], None]] = [add_estimate, add_predict, add_find, add_gpus]
"""Functions that each add one subcommand to the parser (append to add a subcommand)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``batchfinder`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="batchfinder", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"batchfinder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the search does to standard error")
    # Each command is listed once, under "commands", from the help= its add_<name> function gives.
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 an error the message explains, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from .errors import BatchFinderError

    try:
        return int(args.handler(args) or 0)
    except (CommandError, ValueError, TypeError, BatchFinderError, ImportError) as exc:
        print(f"batchfinder {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
