"""The examples run as a user runs them, and the package keeps its import boundaries."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: int = 300) -> str:
    env = {**os.environ, "BATCHFINDER_DATA": str(ROOT / "tests" / "no-such-data")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_main_job_on_a_small_simulated_gpu():
    out = _run("examples/mnist_mlp.py", "--device", "sim:6MiB")
    assert "101,770 parameters" in out
    assert "FakeData with MNIST's shape (1, 28, 28)" in out
    assert "SimulatedGPU(6.00 MiB)" in out
    assert "trial  1: batch      16  fits" in out
    lines = [line for line in out.splitlines() if line.startswith("recommended batch size:")]
    assert len(lines) == 1
    recommended = int(lines[0].split(":")[1])
    largest = int(out.split("largest that fits: ")[1].split(";")[0])
    # The caching allocator serves requests up to 1 MiB from 2 MiB segments and larger ones from 20 MiB segments:
    # 334 samples of 3,136 B are the largest input batch within 1 MiB; 335 need a 20 MiB segment, more than 6 MiB.
    assert recommended == int(0.8 * largest) and largest == 334
    assert "stopped: bracket closed" in out


def test_cifar10_example_power_mode():
    out = _run("examples/cifar10_mlp.py", "--device", "sim:24MiB", "--mode", "power")  # the model reserves 22 MiB
    assert "394,634 parameters" in out
    assert "stopped: power: last doubling that fit" in out


def test_fsdp2_example_two_ranks_agree_and_train_at_the_answer():
    """Two CPU ranks over gloo, the second with a smaller simulated GPU: both print the same answer, and three
    sharded training steps at the recommended size fit on a fresh simulated GPU of each rank's capacity."""
    out = _run("examples/fsdp2_transformer.py", "--capacity", "112MiB", "--uneven")
    assert "each of 6 blocks and the root sharded over 2 ranks" in out
    assert "agreed by 2 ranks" in out
    answers = [line.split(": ", 1)[1].split(";")[0] for line in out.splitlines() if line.startswith("rank ") and "largest" in line]
    assert len(answers) == 2 and answers[0] == answers[1], out
    assert "3 training steps at" in out


def test_core_imports_no_optional_extras():
    code = (
        "import sys, batchfinder\n"
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'torchvision', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
    )
    assert _run("-c", code).strip() == "[]"


def test_package_never_imports_examples_or_benchmarks():
    for path in (ROOT / "batchfinder").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("examples", "benchmarks"), f"{path} imports {name}"


def test_no_print_in_the_library():
    allowed = {"cli.py"}  # the command line prints its output by design
    for path in (ROOT / "batchfinder").rglob("*.py"):
        if path.name in allowed:
            continue
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{path} calls print(); use logging"


@pytest.mark.skipif(sys.platform != "linux", reason="checks the working tree on the CI platform")
def test_examples_leave_no_files_behind(tmp_path):
    before = {p for p in ROOT.rglob("*") if not {".venv", "__pycache__", ".git", ".pytest_cache"} & set(p.parts)}
    _run("examples/mnist_mlp.py", "--device", "sim:6MiB")
    after = {p for p in ROOT.rglob("*") if not {".venv", "__pycache__", ".git", ".pytest_cache"} & set(p.parts)}
    assert after - before == set()
