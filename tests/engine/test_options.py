"""SearchOptions: one path from every front end's arguments, one name per concept, the same defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from batchfinder.api import find_batch_size, try_batch_size
from batchfinder.engine.options import SearchOptions
from batchfinder.hf.trainer import find_trainer_batch_size
from batchfinder.lightning.callback import BatchFinder

FRONT_ENDS = {
    "find_batch_size": find_batch_size,
    "BatchFinder": BatchFinder.__init__,
    "find_trainer_batch_size": find_trainer_batch_size,
}
DIFFERENT_DEFAULTS = {
    ("find_trainer_batch_size", "init_batch_size"): None,  # the Trainer's own per_device_train_batch_size
}
"""Defaults a front end sets from its framework, documented in its docstring."""


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_every_front_end_takes_every_option_by_its_name_and_default(front_end):
    parameters = inspect.signature(FRONT_ENDS[front_end]).parameters
    for field in dataclasses.fields(SearchOptions):
        assert field.name in parameters, f"{front_end} has no {field.name}"
        parameter = parameters[field.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{front_end}({field.name}) is not keyword-only"
        expected = DIFFERENT_DEFAULTS.get((front_end, field.name), field.default)
        assert parameter.default == expected, f"{front_end}({field.name}={parameter.default!r}), options: {expected!r}"


def test_the_front_ends_share_the_names_of_what_they_share():
    """Beyond the options: the device, the memory limit, the data scan and the evaluation batch size."""
    shared = ("device", "memory_limit", "sample_size", "scan_budget", "eval_batch_size")
    lightning = inspect.signature(BatchFinder.__init__).parameters
    trainer = inspect.signature(find_trainer_batch_size).parameters
    for name in shared:
        assert name in lightning and name in trainer, name
    function = inspect.signature(find_batch_size).parameters
    for name in ("device", "memory_limit", "sample_size", "scan_budget", "precision"):
        assert name in function and name in inspect.signature(try_batch_size).parameters
        assert function[name].default == inspect.signature(try_batch_size).parameters[name].default


def test_from_arguments_takes_the_options_by_name_and_validates_them():
    arguments = {"mode": "power", "safety": 0.5, "device": "sim:1GiB", "self": object()}
    options = SearchOptions.from_arguments(arguments, max_trials=3)
    assert (options.mode, options.safety, options.max_trials, options.init_batch_size) == ("power", 0.5, 3, 16)
    with pytest.raises(ValueError, match=r"safety=1\.5"):
        SearchOptions.from_arguments({"safety": 1.5})
    with pytest.raises(ValueError, match="mode='fastest' is not a search mode"):
        SearchOptions.from_arguments({"mode": "fastest"})
    with pytest.raises(TypeError, match="not search options"):
        SearchOptions.from_arguments({}, batch_size=4)


def test_replace_validates_the_changed_options():
    options = SearchOptions()
    assert options.replace(mode="guided").mode == "guided"
    with pytest.raises(ValueError, match="init_batch_size=64 is larger than max_batch_size=8"):
        options.replace(init_batch_size=64, max_batch_size=8)
