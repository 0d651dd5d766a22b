"""The model and data set a command names: ``package.module:callable``, ``path/to/file.py:callable`` or
``torchvision:NAME``, called with keyword arguments; problems come back as one line (:class:`CommandError`)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .errors import batchfinder_note, exception_first_line
from .training.synthetic import SequenceDataset

__all__ = ["CommandError", "load_model", "load_data", "described"]


class CommandError(Exception):
    """A problem with the command line that is not argparse's (a model that does not load, ...)."""


def _resolve(spec: str, what: str, example: str) -> Any:
    """The object ``spec`` names: ``package.module:attribute`` or ``path/file.py:attribute`` (dots go into the
    attribute: ``module:Class.method``). ``what`` names the argument in errors (``MODEL``, ``--data``)."""
    if ":" not in spec:
        raise CommandError(f"{what} {spec!r} must be {example}")
    where, name = spec.rsplit(":", 1)
    found: Any = _import(where)
    for part in name.split("."):
        if not hasattr(found, part):
            raise CommandError(f"{where} has no attribute {name!r}")
        found = getattr(found, part)
    return found


def _build(
    spec: str, found: Any, kwargs: dict[str, Any] | None, *, ready: Callable[[Any], bool], flag: str, expected: str
) -> Any:
    """``found`` itself when ``ready(found)``, else ``found(**kwargs)`` (a factory), with one-line errors."""
    if ready(found):
        if kwargs:
            raise CommandError(f"{spec} is a {type(found).__name__}, not a callable: {flag} has nothing to call")
        return found
    if not callable(found):
        raise CommandError(f"{spec} is a {type(found).__name__}, not {expected} or a callable that returns one")
    try:
        return found(**(kwargs or {}))
    except TypeError as exc:
        raise CommandError(
            f"calling {spec} failed: {exception_first_line(exc)} (pass arguments with {flag} '{{\"name\": value}}')"
        ) from exc
    except Exception as exc:  # the user's factory raised: say so in one line, with its type
        raise CommandError(f"calling {spec} failed: {described(exc)}") from exc


def load_model(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Build the model named by ``spec`` (``package.module:callable``, ``path/file.py:callable`` or
    ``torchvision:NAME``), calling it with ``kwargs``."""
    from torch import nn

    example = (
        "package.module:callable (e.g. batchfinder.zoo:mnist_mlp), path/to/file.py:callable or torchvision:NAME "
        "(e.g. torchvision:resnet18)"
    )
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:
            import torchvision.models
        except ImportError as exc:
            raise CommandError("torchvision:NAME needs torchvision: pip install 'batchfinder[vision]'") from exc
        try:
            factory: Any = torchvision.models.get_model_builder(name)
        except ValueError as exc:
            raise CommandError(f"torchvision has no model {name!r} ({exception_first_line(exc)})") from exc
    else:
        factory = _resolve(spec, "MODEL", example)
    model = _build(
        spec, factory, kwargs, ready=lambda value: isinstance(value, nn.Module), flag="--model-kwargs",
        expected="a model",
    )
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_data(value: Any) -> bool:
    """A Dataset or DataLoader, or another object with ``__getitem__`` and ``__len__`` that is not a factory."""
    if isinstance(value, (Dataset, DataLoader)):
        return True
    return not callable(value) and not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__") and hasattr(
        value, "__len__"
    )


def load_data(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The data set named by ``spec`` (``package.module:callable`` or ``path/file.py:callable``, called with
    ``kwargs``; or a Dataset/DataLoader object): a map-style ``Dataset`` or a ``DataLoader``, whose ``collate_fn``
    and sampler are then used."""
    found = _resolve(spec, "--data", "package.module:callable or path/to/file.py:callable returning a Dataset or DataLoader")
    data = _build(spec, found, kwargs, ready=_is_data, flag="--data-kwargs", expected="a Dataset or DataLoader")
    if not _is_data(data):
        raise CommandError(
            f"{spec} returned a {type(data).__name__}, not a map-style Dataset (with __getitem__ and __len__) or a "
            "DataLoader"
        )
    if not isinstance(data, (Dataset, DataLoader)):
        data = SequenceDataset(data)  # a list of samples: a data set, not one sample, for estimate and predict
    return data


_FILE_MODULES: dict[str, Any] = {}
"""Modules imported from files, by absolute path: MODEL and --data from one file share its module."""


def _import(where: str) -> Any:
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise CommandError(f"no such file: {where}")
        path = os.path.abspath(where)
        if path in _FILE_MODULES:
            return _FILE_MODULES[path]
        name = os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(name, where)
        if spec is None or spec.loader is None:
            raise CommandError(f"cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a syntax error, or the module's own code raising
            raise CommandError(f"importing {where} failed: {described(exc)}") from exc
        _FILE_MODULES[path] = module
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory on the path
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise CommandError(f"cannot import {where!r}: {exception_first_line(exc)}") from exc
    except Exception as exc:  # a syntax error, or the module's own code raising
        raise CommandError(f"importing {where} failed: {described(exc)}") from exc


def described(exc: BaseException) -> str:
    """One line for an exception of the user's code: its type, its first line, and where (a syntax error's file and
    line; batchfinder's note on where in a search it was raised)."""
    text = exception_first_line(exc)
    if isinstance(exc, SyntaxError):
        text = f"{exc.msg} ({exc.filename}, line {exc.lineno})"
    note = batchfinder_note(exc)
    where = note.splitlines()[0].removeprefix("batchfinder: ").strip() if note else ""
    return f"{type(exc).__name__}: {text}" + (f" [{where}]" if where else "")
