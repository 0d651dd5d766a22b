"""Plots are real PNG images with content: searches, estimates and predictions."""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder import zoo
from batchfinder.memory.estimate import estimate_memory_curve
from tests.helpers import classification_data

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
    return classification_data(3000, (1, 28, 28), 10)


def test_search_plot_binsearch(tmp_path, mnist):
    result = bf.find_batch_size(zoo.mnist_mlp(), mnist, optimizer=torch.optim.SGD, device=bf.SimulatedGPU("4MiB"), max_trials=8)
    assert result.num_ooms >= 1
    path = tmp_path / "binsearch.png"
    assert result.plot(path) == str(path)
    colours = _read_png(path)
    assert RED in colours and GREEN in colours


def test_search_plot_guided_shows_the_prediction(tmp_path, mnist):
    result = bf.find_batch_size(zoo.mnist_mlp(), mnist, optimizer=torch.optim.Adam, device=bf.SimulatedGPU("5MiB"), mode="guided")
    assert result.predicted_peaks
    path = tmp_path / "guided.png"
    result.plot(str(path))
    colours = _read_png(path)
    assert RED in colours and GREEN in colours and BLUE in colours


def test_estimate_plots(tmp_path):
    estimates = estimate_memory_curve(zoo.mnist_mlp(), (1, 28, 28), [64, 256, 1024, 4096])
    estimates.plot(tmp_path / "estimates.png", capacity="16MiB")
    colours = _read_png(tmp_path / "estimates.png")
    assert RED in colours and BLUE in colours and (85, 168, 104) in colours  # capacity, parameters, batch
    estimates[2].plot(tmp_path / "one.png")
    _read_png(tmp_path / "one.png")


def test_prediction_plot(tmp_path):
    prediction = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), gpu="T4")
    prediction.plot(tmp_path / "prediction.png")
    colours = _read_png(tmp_path / "prediction.png")
    assert RED in colours and BLUE in colours


def test_sizes_predicted_to_run_out_of_memory_are_marked_on_the_capacity_not_drawn_as_a_jump():
    pytest.importorskip("matplotlib")
    from batchfinder.plot import prediction_figure

    prediction = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), capacity="16MiB", optimizer=torch.optim.Adam)
    assert any(peak > prediction.capacity_bytes for peak in prediction.curve.values())  # 335 "would need" more
    axes = prediction_figure(prediction).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    capacity_mib = prediction.capacity_bytes / 2**20
    assert max(lines["predicted peak"].get_ydata()) <= capacity_mib
    failing = next(line for label, line in lines.items() if label.startswith("predicted: runs out of memory"))
    assert prediction.max_batch_size + 1 in list(failing.get_xdata())
    assert set(failing.get_ydata()) == {capacity_mib}
    assert any(prediction.next_failure in text.get_text() for text in axes.texts)


def test_plot_into_a_missing_directory_is_a_clear_error(tmp_path):
    est = bf.estimate_memory(zoo.mnist_mlp(), (1, 28, 28), 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        est.plot(tmp_path / "no" / "such" / "dir" / "x.png")


def test_core_never_imports_matplotlib_and_plots_never_touch_pyplot(tmp_path):
    code = (
        "import sys, torch, batchfinder as bf\n"
        "from torch.utils.data import TensorDataset\n"
        "from batchfinder import zoo\n"
        "m = zoo.mnist_mlp()\n"
        "bf.estimate_memory(m, (1, 28, 28), 64)\n"
        "bf.find_batch_size(m, TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))), "
        "device=bf.SimulatedGPU('64MiB'), mode='guided')\n"
        "print('matplotlib' in sys.modules)\n"
        "from batchfinder.memory.estimate import estimate_memory_curve\n"
        f"estimate_memory_curve(m, (1, 28, 28), [64, 128]).plot({str(tmp_path / 'x.png')!r})\n"
        "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "False"]


def _adjacent_result() -> "object":
    """A guided search whose largest size that fits (1,000) and smallest that does not (1,001) are adjacent, the
    failed trial stopping at about the same peak: their markers land on the same spot."""
    from batchfinder.result import SearchResult, Trial
    from batchfinder.search.strategies import StopReason

    mib = 1024**2
    trials = [
        Trial(batch_size=1200, fits=False, peak_bytes=int(5.6 * mib), seconds_per_step=None, steps=1),
        Trial(batch_size=1000, fits=True, peak_bytes=int(6.0 * mib), seconds_per_step=0.01, steps=2),
        Trial(batch_size=1001, fits=False, peak_bytes=int(6.0 * mib), seconds_per_step=None, steps=1),
    ]
    return SearchResult(
        max_batch_size=1000,
        batch_size=800,
        trials=trials,
        stop_reason=StopReason.BRACKET_CLOSED,
        mode="guided",
        device="SimulatedGPU(8.00 MiB)",
        capacity_bytes=8 * mib,
        smallest_failure=1001,
        predicted_peaks={256: 2 * mib, 1000: int(6.0 * mib), 1200: int(7.0 * mib)},
    )


def test_search_plot_fits_marker_stays_visible_over_the_next_sizes_out_of_memory_marker():
    import numpy as np
    from matplotlib.markers import MarkerStyle

    from batchfinder.plot import search_figure

    result = _adjacent_result()
    figure = search_figure(result)
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    fits = lines["trial: fits"]
    ooms = next(line for label, line in lines.items() if label.startswith("trial: out of memory"))
    # The dots of trials that fit are drawn above the crosses, smaller, in another shape; the crosses are open strokes.
    assert fits.get_zorder() > ooms.get_zorder()
    assert fits.get_marker() != ooms.get_marker()
    assert fits.get_markersize() < ooms.get_markersize()
    assert not MarkerStyle(ooms.get_marker()).is_filled()
    assert list(fits.get_xdata()) == [1000] and list(ooms.get_xdata()) == [1200, 1001]
    # Rendered: the centre of the dot at 1,000 is green, and the cross at 1,001 still shows red around it.
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    x, y = axes.transData.transform((1000, fits.get_ydata()[0]))
    row, col = int(round(pixels.shape[0] - y)), int(round(x))
    assert tuple(pixels[row, col]) == GREEN
    around = pixels[row - 9 : row + 10, col - 9 : col + 10].reshape(-1, 3)
    assert any(tuple(p) == RED for p in around)


def test_plot_module_imports_result_types_for_type_checking_only():
    import ast

    import batchfinder.plot

    tree = ast.parse(pathlib.Path(batchfinder.plot.__file__).read_text())
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            guarded.update(id(child) for child in ast.walk(node))
    imported = {  # (module, imported under TYPE_CHECKING only)
        (node.module or "", id(node) in guarded) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
    }
    assert not any(module.startswith("engine") for module, _ in imported)  # never the engine
    assert {("result", True), ("memory.estimate", True), ("memory.predict", True)} <= imported
    assert {module for module, type_checking_only in imported if not type_checking_only} == {"units"}  # at run time


def test_the_search_plot_shows_reserved_peaks_on_a_caching_allocator():
    pytest.importorskip("matplotlib")
    from batchfinder.plot import search_figure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    data = TensorDataset(torch.randn(2048, 32), torch.randint(0, 4, (2048,)))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), max_trials=4)
    labels = [line.get_label() for line in search_figure(result).axes[0].get_lines()]
    assert "trial: peak reserved (allocator segments)" in labels
    ideal = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB", allocator="ideal"), max_trials=4)
    assert "trial: peak reserved (allocator segments)" not in [l.get_label() for l in search_figure(ideal).axes[0].get_lines()]
