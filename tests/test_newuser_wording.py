"""User-facing text says what things are: no internal words ("seeds") in docstrings, comments, help or messages."""

from __future__ import annotations

import inspect

import pytest

import batchfinder.cli
import batchfinder.engine.oom
import batchfinder.memory.estimate
import batchfinder.memory.tracing
import batchfinder.plot
import batchfinder.training.synthetic

MODULES = [batchfinder.memory.estimate, batchfinder.memory.tracing, batchfinder.cli, batchfinder.plot, batchfinder.training.synthetic, batchfinder.engine.oom]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_source_does_not_say_seeds(module):
    """Docstrings, comments and messages alike (the source holds them all)."""
    assert "seeds" not in inspect.getsource(module).lower()


def test_command_help_does_not_say_seeds():
    parser = batchfinder.cli.build_parser()
    texts = [parser.format_help()] + [sub.format_help() for sub in parser._subparsers._group_actions[0].choices.values()]
    assert all("seeds" not in text.lower() for text in texts)
