"""The ``batchfinder`` command: estimate memory, predict the largest batch size, or find it with real trials.

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and sets its handler; to add a
subcommand, write such a function and append it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


from .errors import BatchFinderError, batchfinder_note
from .loading import CommandError, described, load_data, load_model
from .memory.cudnn import CUDNN_WORKSPACES
from .memory.kernels import KERNELS
from .search.checks import MIN_STEPS_PER_TRIAL
from .training.precision import PRECISIONS
from .training.sample_sizes import DEFAULT_SCAN_BUDGET
from .training.synthetic import DTYPES, SyntheticDataset, parse_shape
from .units import parse_bytes

__all__ = ["main", "build_parser", "load_model", "load_data", "SUBCOMMANDS"]

FIND_MODES = ("binsearch", "power", "guided")
"""``--mode`` choices: the modes of :data:`batchfinder.engine.modes.MODES` (a test keeps them equal); others: exit 2."""

_DESCRIPTION = "Find the batch size a PyTorch model can train with on a GPU."
"""The top of ``batchfinder --help``; the commands are listed under it from each subparser's ``help``."""

_EPILOG = """\
MODEL is package.module:callable (called with no arguments, or with --model-kwargs), a file
path/to/models.py:callable, or torchvision:NAME (a torchvision model, e.g. torchvision:resnet18).
Built-in models: batchfinder.zoo:mnist_mlp (input 1x28x28) and batchfinder.zoo:cifar10_mlp (3x32x32).
Instead of --input SHAPE, --data SPEC names a callable (as for MODEL, with --data-kwargs) returning your Dataset
or DataLoader: find searches on it, estimate and predict use its largest sample.

examples:
  batchfinder estimate batchfinder.zoo:mnist_mlp --input 1x28x28 --batch-sizes 64,256,1024,4096 --optimizer sgd
  batchfinder predict torchvision:resnet18 --input 3x224x224 --gpu A100-40GB
  batchfinder find batchfinder.zoo:mnist_mlp --input 1x28x28 --device sim:64MiB --mode guided --plot search.png
  batchfinder find mymodels.py:model --data mydata.py:train_loader --device sim:16GiB

Run batchfinder COMMAND --help for the options of a command.
"""

_DATA_NOTE = """\
With --input, find trains on synthetic data: inputs of the --input shape (standard normal; zeros for integer
--dtype) and targets made to suit the model's output: for an output of shape (N, C, ...) integer class labels in
[0, C) (cross-entropy), for (N,) or (N, 1) float targets (mean squared error), none when the model returns a scalar.
The dataset has --samples samples, the largest batch size the search may try.

With --data, find trains on your dataset (or DataLoader, with its collate_fn). When its samples differ in size, a
trial of batch size B runs on the B largest samples (the worst case of every batch of B); the result's "data:" line
says what the scan found (--scan-budget bounds its time).
"""


# -- shared helpers -----------------------------------------------------------------------------------------------
def _check_plot_path(path: str | None) -> None:
    """Refuse a --plot file whose directory does not exist or cannot be written, before any work."""
    folder = os.path.dirname(os.path.abspath(path)) if path is not None else None
    if folder is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise CommandError(f"--plot {path}: the directory {folder} does not exist or is not writable (create it first)")


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

    try:
        return parse_shape(text, argument="--input")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _json_object(flag: str) -> Callable[[str], dict[str, Any]]:
    """An argparse type for ``flag``: a JSON object of keyword arguments."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({exc})")
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, e.g. '{{\"num_classes\": 10}}'")
        return value

    return parse


def _scan_budget(text: str) -> float:
    from .training.sample_sizes import check_scan_budget

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 10)")
    try:
        return check_scan_budget(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds (e.g. 10)")


def _steps(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of steps, 0 for none")
    return steps


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="package.module:callable, path/file.py:callable or torchvision:NAME")
    sample = parser.add_mutually_exclusive_group(required=True)
    sample.add_argument(
        "--input", type=_shape, metavar="SHAPE", help="shape of one input sample without the batch dimension, e.g. 1x28x28"
    )
    sample.add_argument(
        "--data", metavar="SPEC", help="instead of --input: package.module:callable or path/file.py:callable returning "
        "a map-style Dataset or a DataLoader (its collate_fn and sampler are used); its largest samples are used"
    )
    parser.add_argument(
        "--dtype", default=None, help="dtype of the --input: float32 (default), float16, bfloat16, int64 (token ids), ..."
    )
    parser.add_argument("--optimizer", default=None, help="a torch.optim optimizer by name: adam (default), sgd, adamw, ...")
    parser.add_argument(
        "--inference", action="store_true",
        help="size inference instead of training: forward passes in eval mode without gradients, no optimizer",
    )
    parser.add_argument(
        "--model-kwargs", type=_json_object("--model-kwargs"), default=None, metavar="JSON", help="keyword arguments for MODEL, as a JSON object"
    )
    parser.add_argument(
        "--data-kwargs", type=_json_object("--data-kwargs"), default=None, metavar="JSON", help="keyword arguments for --data, as a JSON object"
    )
    parser.add_argument(
        "--scan-budget", type=_scan_budget, default=DEFAULT_SCAN_BUDGET, metavar="SECONDS",
        help="with --data: seconds the scan for its largest samples may take (default 10)",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="32-true",
        help="training precision, as Lightning names it (default 32-true); mixed precision follows CUDA's autocast",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--plot", metavar="PNG", default=None, help="also write a plot to this PNG file")


def _add_kernels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels", choices=KERNELS, default="cuda",
        help="whose kernels' memory to model: cuda (default: attention and the optimizer's step as on a GPU) or cpu",
    )
    parser.add_argument(
        "--cudnn-workspace", type=_cudnn_workspace, default=None, metavar="auto|none|SIZE",
        help="what each convolution charges as cuDNN's workspace with --kernels cuda: auto (default: its input + "
        "output bytes in the forward pass, calibrated against published measurements), none, or a fixed size such "
        "as 256MiB charged after each convolution's output and gradients",
    )


def _cudnn_workspace(text: str) -> str | int:
    """``--cudnn-workspace``: ``auto``, ``none`` or a size such as ``256MiB`` (``0`` for none)."""
    if text.lower() in CUDNN_WORKSPACES:
        return text.lower()
    if text.strip() == "0":
        return 0
    try:
        return parse_bytes(text, argument="--cudnn-workspace")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or auto (the default model) or none") from None


def _prepare(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, optimizer class, input dtype) from the shared arguments."""

    if args.data is not None and args.dtype is not None:
        raise CommandError("--dtype sets the dtype of synthetic --input data; with --data the dataset's dtypes are used")
    if args.data is None and args.data_kwargs is not None:
        raise CommandError("--data-kwargs needs --data (the callable it is passed to)")
    name = args.dtype or "float32"
    dtype = DTYPES.get(name.lower())
    if dtype is None:
        raise CommandError(f"--dtype {name!r} is not one of {', '.join(sorted(DTYPES))}")
    if args.inference and args.optimizer is not None:
        raise CommandError("--inference runs no optimizer: leave --optimizer out")
    optimizer = None if args.inference else _optimizer(args.optimizer or "adam")
    return load_model(args.model, args.model_kwargs), optimizer, dtype


def _sample(args: argparse.Namespace) -> Any:
    """What the estimate traces: the --input shape, or the --data set (its largest sample)."""
    return args.input if args.data is None else load_data(args.data, args.data_kwargs)


def _data_length(data: Any) -> int:
    return len(getattr(data, "dataset", data))


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
    _add_kernels_argument(parser)
    parser.set_defaults(handler=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the estimates at ``--batch-sizes`` (a table, or one estimate's breakdown), optionally plot them."""
    from .memory.estimate import estimate_memory_curve

    model, optimizer, dtype = _prepare(args)
    estimates = estimate_memory_curve(
        model, _sample(args), list(args.batch_sizes), optimizer=optimizer, input_dtype=dtype, scan_budget=args.scan_budget,
        precision=args.precision, train=not args.inference, kernels=args.kernels, cudnn_workspace=args.cudnn_workspace,
    )
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
    from .memory.gpus import known_gpu_names

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
    parser.add_argument(
        "--world-size", type=int, default=None,
        help="per GPU of an FSDP2 job sharding the model over this many GPUs (one rank traced, no GPUs needed)",
    )
    parser.add_argument(
        "--wrap", metavar="CLASS", default=None,
        help="with --world-size: the class name of the blocks sharded as units of their own (the root always is)",
    )
    _add_kernels_argument(parser)
    parser.set_defaults(handler=run_predict)


def _sharding(args: argparse.Namespace) -> Any:
    """The ``Sharding`` that ``--world-size`` and ``--wrap`` describe (None without them)."""
    from .memory.sharding import Sharding

    if args.world_size is None:
        if args.wrap is not None:
            raise CommandError("--wrap says which blocks FSDP2 shards: give --world-size too")
        return None
    if args.wrap is None:
        return Sharding(args.world_size)
    name = args.wrap

    def picks(module: Any) -> bool:
        return type(module).__name__ == name

    picks.__name__ = name  # named in messages
    return Sharding(args.world_size, wrap=picks)


def run_predict(args: argparse.Namespace) -> int:
    from .memory.predict import predict_max_batch_size

    model, optimizer, dtype = _prepare(args)
    prediction = predict_max_batch_size(
        model,
        _sample(args),
        capacity=args.capacity,
        gpu=args.gpu,
        optimizer=optimizer,
        safety=args.safety,
        max_batch_size=args.max_batch_size,
        input_dtype=dtype,
        scan_budget=args.scan_budget,
        precision=args.precision,
        train=not args.inference,
        kernels=args.kernels,
        cudnn_workspace=args.cudnn_workspace,
        sharding=_sharding(args),
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
    parser.add_argument(
        "--mode", default="binsearch", choices=FIND_MODES, help="search mode: binsearch (default), power or guided"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="size of the synthetic --input dataset: the largest batch size tried (default 65536)"
    )
    parser.add_argument("--safety", type=float, default=0.8, help="recommend floor(SAFETY x largest) (default 0.8)")
    parser.add_argument("--max-trials", type=int, default=None, help="stop after this many trials")
    parser.add_argument(
        "--confirm-steps", type=_steps, default=MIN_STEPS_PER_TRIAL, metavar="N",
        help="after the search, N training steps at the recommended size with the cache kept (default 2; 0: none)",
    )
    parser.add_argument("--progress", action="store_true", help="print a line per trial to standard error")
    parser.set_defaults(handler=run_find)


def run_find(args: argparse.Namespace) -> int:
    import torch

    from .api import find_batch_size

    model, optimizer, dtype = _prepare(args)
    if args.data is not None and args.samples is not None:
        raise CommandError("--samples sizes the synthetic --input data; with --data the dataset's length caps the search")
    samples = 65536 if args.samples is None else args.samples
    if samples < 1:
        raise CommandError("--samples must be at least 1")
    device = args.device
    if device is None:
        if not torch.cuda.is_available():
            raise CommandError("no CUDA GPU here: pass --device sim:SIZE (e.g. sim:16GiB) to search on a simulated GPU")
        device = "cuda"
    if args.data is None:
        from .memory.shapes import target_for_shape

        target = target_for_shape(model, args.input, dtype)
        dataset = SyntheticDataset(args.input, samples, target=target, dtype=dtype)
        described = "none" if target is None else target.describe()
        heading = f"synthetic data: {samples:,} samples of shape {args.input}, targets: {described}"
    else:
        target = None
        dataset = load_data(args.data, args.data_kwargs)
        heading = f"dataset: {args.data} ({_data_length(dataset):,} samples)"
    if args.progress and not args.json:
        print(heading, flush=True)  # the per-trial lines (standard error) then follow the heading, as they run
    result = find_batch_size(
        model,
        dataset,
        optimizer=optimizer,
        device=device,
        mode=args.mode,
        safety=args.safety,
        max_trials=args.max_trials,
        progress=args.progress,
        confirm_steps=args.confirm_steps,
        scan_budget=args.scan_budget,
        precision=args.precision,
        train=not args.inference,
    )
    if args.plot:
        result.plot(args.plot)
    data = {
        **result.as_dict(),
        "data": args.data,
        "targets": None if target is None else target.describe(),
        "plot": args.plot,
    }
    text = f"{result}" if args.progress else f"{heading}\n{result}"
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
    from .devices import nvml

    report = nvml.query()
    _emit(args, report.to_dict(), nvml.format_report(report))
    return 0


# -- entry point --------------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[Any], None]] = [add_estimate, add_predict, add_find, add_gpus]
"""Functions that each add one subcommand to the parser (append to add a subcommand)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on standard error (with ``--json`` also an error object on standard output), exit 2."""

    wants_json = False  # whether the command line being parsed has --json

    def error(self, message: str) -> Any:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        _report_error(command, f"{message} (see {self.prog} --help)", "usage", as_json=_Parser.wants_json)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``batchfinder`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    from . import __version__

    parser = _Parser(
        prog="batchfinder", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"batchfinder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the search does to standard error")
    # Each command is listed once, under "commands", from the help= its add_<name> function gives.
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _report_error(command: str | None, message: str, kind: str, *, as_json: bool) -> None:
    """One line on standard error; with ``--json`` also ``{"error": {"command", "type", "message"}}`` on standard
    output (``type``: the exception's class name, ``"usage"`` for a bad command line)."""
    line = " ".join(message.split())
    print(f"batchfinder{' ' + command if command else ''}: error: {line}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"command": command, "type": kind, "message": line}}, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 1 an error (one line on standard error; the user's code's
    with its type and where it was raised), 2 bad usage (``SystemExit(2)`` from the parser), 130 Ctrl-C."""
    _Parser.wants_json = "--json" in (sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    as_json = bool(getattr(args, "json", False))
    try:
        _check_plot_path(getattr(args, "plot", None))  # before the work whose result the plot would show
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        _report_error(args.command, "interrupted (Ctrl-C)", "KeyboardInterrupt", as_json=as_json)
        return 130
    except Exception as exc:
        checks = (CommandError, BatchFinderError, ValueError, TypeError, ImportError)  # the library's own checks
        own = isinstance(exc, checks) and (isinstance(exc, CommandError) or batchfinder_note(exc) is None)
        kind = type(exc.__cause__ if isinstance(exc, CommandError) and exc.__cause__ is not None else exc).__name__
        _report_error(args.command, str(exc) if own else described(exc), kind, as_json=as_json)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
