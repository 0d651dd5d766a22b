"""Plots are real PNG images with content: searches, estimates and predictions."""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import batchfinder as bf

ROOT = pathlib.Path(__file__).resolve().parents[1]
RED = (214, 39, 40)  # out-of-memory markers and the capacity line
GREEN = (44, 160, 44)  # trials that fitted
BLUE = (76, 114, 176)  # the predicted curve / parameters


def _read_png(path: pathlib.Path) -> set[tuple[int, int, int]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (900, 550)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (550, 900)
    rgb = (pixels[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(int(c) for c in p) for p in rgb}
    assert len(colours) > 30, "the image is nearly blank"
    white = sum(1 for p in rgb[::11] if tuple(p) == (255, 255, 255))
    assert white < 0.97 * len(rgb[::11])
    return colours


@pytest.fixture(scope="module")
def mnist() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(3000, 1, 28, 28, generator=g), torch.randint(0, 10, (3000,), generator=g))


def test_search_plot_binsearch(tmp_path, mnist):
    result = bf.find_batch_size(bf.zoo.mnist_mlp(), mnist, optimizer=torch.optim.SGD, device=bf.SimulatedGPU("4MiB"), max_trials=8)
    assert result.num_ooms >= 1
    path = tmp_path / "binsearch.png"
    assert result.plot(path) == str(path)
    colours = _read_png(path)
    assert RED in colours and GREEN in colours


def test_search_plot_guided_shows_the_prediction(tmp_path, mnist):
    result = bf.find_batch_size(bf.zoo.mnist_mlp(), mnist, optimizer=torch.optim.Adam, device=bf.SimulatedGPU("5MiB"), mode="guided")
    assert result.extra["predicted_peaks"]
    path = tmp_path / "guided.png"
    result.plot(str(path))
    colours = _read_png(path)
    assert RED in colours and GREEN in colours and BLUE in colours


def test_estimate_plots(tmp_path):
    estimates = bf.estimate_memory(bf.zoo.mnist_mlp(), (1, 28, 28), [64, 256, 1024, 4096])
    estimates.plot(tmp_path / "estimates.png", capacity="16MiB")
    colours = _read_png(tmp_path / "estimates.png")
    assert RED in colours and BLUE in colours and (85, 168, 104) in colours  # capacity, parameters, batch
    estimates[2].plot(tmp_path / "one.png")
    _read_png(tmp_path / "one.png")


def test_prediction_plot(tmp_path):
    prediction = bf.predict_max_batch_size(bf.zoo.mnist_mlp(), (1, 28, 28), gpu="T4")
    prediction.plot(tmp_path / "prediction.png")
    colours = _read_png(tmp_path / "prediction.png")
    assert RED in colours and BLUE in colours


def test_plot_into_a_missing_directory_is_a_clear_error(tmp_path):
    est = bf.estimate_memory(bf.zoo.mnist_mlp(), (1, 28, 28), 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        est.plot(tmp_path / "no" / "such" / "dir" / "x.png")


def test_core_never_imports_matplotlib_and_plots_never_touch_pyplot(tmp_path):
    code = (
        "import sys, torch, batchfinder as bf\n"
        "from torch.utils.data import TensorDataset\n"
        "m = bf.zoo.mnist_mlp()\n"
        "bf.estimate_memory(m, (1, 28, 28), 64)\n"
        "bf.find_batch_size(m, TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))), "
        "device=bf.SimulatedGPU('64MiB'), mode='guided')\n"
        "print('matplotlib' in sys.modules)\n"
        f"bf.estimate_memory(m, (1, 28, 28), [64, 128]).plot({str(tmp_path / 'x.png')!r})\n"
        "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "False"]
