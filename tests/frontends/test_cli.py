"""The batchfinder command line: estimate, predict, find; tables, JSON, plots and clear errors."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import batchfinder as bf
from batchfinder import cli, zoo
from batchfinder.cli import SUBCOMMANDS, build_parser, load_model, main
from batchfinder.memory.estimate import estimate_memory_curve

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_reads_well():
    done = subprocess.run([sys.executable, "-m", "batchfinder.cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0
    for text in ("estimate", "predict", "find", "batchfinder.zoo:mnist_mlp", "torchvision:resnet18", "--gpu A100-40GB"):
        assert text in done.stdout
    find_help = build_parser()._subparsers._group_actions[0].choices["find"].format_help()
    assert "synthetic" in find_help and "integer class labels" in find_help and "sim:64MiB" in find_help
    assert [f.__name__ for f in SUBCOMMANDS][:3] == ["add_estimate", "add_predict", "add_find"]  # one function each


def test_console_script_is_installed():
    script = shutil.which("batchfinder", path=str(pathlib.Path(sys.executable).parent))
    if script is None:
        pytest.skip("the console script is not installed in this environment")
    done = subprocess.run([script, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--gpu" in done.stdout and "known GPUs: T4" in done.stdout


def test_estimate_table_and_json(capsys):
    code, out, _ = _run(capsys, "estimate", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--batch-sizes", "64,256,1024,4096", "--optimizer", "sgd")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["64", "256", "1,024", "4,096"]
    assert "optimizer SGD" in out and "101,770 parameters" in out and "MiB" in out
    code, out, _ = _run(capsys, "estimate", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--batch-sizes", "64,1024", "--optimizer", "sgd", "--json")
    data = json.loads(out)
    expected = estimate_memory_curve(zoo.mnist_mlp(), (1, 28, 28), [64, 1024], optimizer=torch.optim.SGD)
    assert [e["peak"] for e in data["estimates"]] == [e.peak for e in expected]
    assert data["estimates"][0]["parameters"] == 407_552 and data["estimates"][0]["optimizer_state"] == 0


def test_predict_json_matches_the_api(capsys):
    code, out, _ = _run(capsys, "predict", "batchfinder.zoo:cifar10_mlp", "--input", "3x32x32", "--capacity", "24MiB", "--json")
    assert code == 0
    data = json.loads(out)
    api = bf.predict_max_batch_size(zoo.cifar10_mlp(), (3, 32, 32), capacity="24MiB")
    assert data["max_batch_size"] == api.max_batch_size and data["batch_size"] == api.batch_size
    code, out, _ = _run(capsys, "predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--gpu", "a100-40gb")
    assert code == 0 and "on A100-40GB" in out and "recommended batch size" in out


def test_find_on_a_simulated_gpu_with_a_plot(capsys, tmp_path):
    png = tmp_path / "search.png"
    code, out, err = _run(
        capsys, "find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:6MiB", "--mode", "guided", "--samples", "5000", "--plot", str(png), "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    predicted = bf.predict_max_batch_size(zoo.mnist_mlp(), (1, 28, 28), capacity="6MiB").max_batch_size
    assert data["max_batch_size"] == predicted and data["num_trials"] <= 2 and data["num_ooms"] <= 1
    assert data["targets"] == "integer class labels in [0, 10)"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = _run(capsys, "find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:6MiB", "--samples", "5000", "--max-trials", "3")
    assert code == 0 and "batch size search on SimulatedGPU(6.00 MiB)" in out and "synthetic data: 5,000 samples" in out


def test_model_from_a_file_and_torchvision(capsys, tmp_path):
    source = tmp_path / "mymodels.py"
    source.write_text(
        "from torch import nn\n"
        "def regressor(width=16):\n"
        "    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))\n"
    )
    code, out, _ = _run(capsys, "estimate", f"{source}:regressor", "--input", "8", "--batch-sizes", "32", "--model-kwargs", '{"width": 64}', "--json")
    assert code == 0
    data = json.loads(out)["estimates"][0]
    assert data["parameter_count"] == 8 * 64 + 64 + 64 + 1
    assert data["sample_parts"] == {"input": 32, "target": 4}  # a float target for a (N, 1) output
    pytest.importorskip("torchvision")
    code, out, _ = _run(capsys, "estimate", "torchvision:resnet18", "--input", "3x32x32", "--batch-sizes", "2", "--model-kwargs", '{"num_classes": 10}')
    assert code == 0 and "ResNet" in out and "buffers" in out


def test_cli_does_not_import_torchvision_unless_asked():
    code = "import sys, batchfinder.cli as c; c.build_parser(); print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() == "False"


def test_errors_are_one_clear_line(capsys):
    code, _, err = _run(capsys, "predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--gpu", "Z80")
    assert code == 1 and "known GPUs: T4" in err and "Traceback" not in err
    code, _, err = _run(capsys, "estimate", "batchfinder.zoo:mnist_mlp", "--input", "3x28x28")
    assert code == 1 and "sample=(3, 28, 28)" in err
    code, _, err = _run(capsys, "estimate", "batchfinder.zoo:no_such_model", "--input", "1x28x28")
    assert code == 1 and "has no attribute 'no_such_model'" in err
    code, _, err = _run(capsys, "estimate", "mnist_mlp", "--input", "1x28x28")
    assert code == 1 and "package.module:callable" in err
    code, _, err = _run(capsys, "estimate", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--optimizer", "adamx")
    assert code == 1 and "adamw" in err
    code, _, err = _run(capsys, "predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--capacity", "100KiB")
    assert code == 1 and "too small for batch size 1" in err
    with pytest.raises(SystemExit) as usage:
        main(["estimate", "batchfinder.zoo:mnist_mlp", "--input", "1 by 28"])
    assert usage.value.code == 2
    assert "is not an input shape" in capsys.readouterr().err


def test_load_model_accepts_instances_and_factories():
    assert isinstance(load_model("batchfinder.zoo:mnist_mlp"), torch.nn.Module)
    assert sum(p.numel() for p in load_model("batchfinder.zoo:cifar10_mlp").parameters()) == 394_634


def test_command_help_does_not_say_seeds():
    parser = build_parser()
    texts = [parser.format_help()] + [sub.format_help() for sub in parser._subparsers._group_actions[0].choices.values()]
    assert all("seeds" not in text.lower() for text in texts)


def test_help_lists_each_command_once():
    import re

    text = build_parser().format_help()
    names = build_parser()._subparsers._group_actions[0].choices
    assert set(names) == {"estimate", "predict", "find", "gpus"}
    for name in names:
        listed = [line for line in text.splitlines() if re.match(rf"\s+{name}\s", line)]
        assert len(listed) == 1, f"{name!r} is listed {len(listed)} times in batchfinder --help:\n{text}"


def test_wrong_input_shape_prints_only_the_error(capfd):
    code = main(["estimate", "batchfinder.zoo:mnist_mlp", "--input", "3x32x32", "--batch-sizes", "64"])
    out, err = capfd.readouterr()
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # torch's fake-tensor traceback (18 lines) is not printed
    assert lines[0].startswith("batchfinder estimate: error: sample=(3, 32, 32)")


def test_a_failing_model_factory_is_reported_in_one_line(capsys, tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("def build():\n    raise TypeError('bad width\\n  detail one\\n  detail two')\n")
    code, _, err = _run(capsys, "estimate", f"{source}:build", "--input", "8")
    assert code == 1
    assert err.strip() == (
        f"batchfinder estimate: error: calling {source}:build failed: bad width "
        "(pass arguments with --model-kwargs '{\"name\": value}')"
    )


# -- --data: the user's own dataset -----------------------------------------------------------------------------------
TEXT_DATA = '''
import torch
from torch import nn
from torch.utils.data import DataLoader

VOCAB = 50


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 64)
        self.out = nn.Linear(64, 5)

    def forward(self, tokens):
        return self.out(torch.relu(self.hidden(self.embed(tokens))).mean(dim=1))


def model():
    torch.manual_seed(0)
    return TokenNet()


def samples(count=256, longest=96):
    """(token ids, label) pairs, the shortest first: lengths grow from 4 to ``longest`` with the index."""
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randint(1, VOCAB, (4 + i * (longest - 4) // (count - 1),), generator=generator).tolist(), i % 5)
        for i in range(count)
    ]


def pad(batch):
    tokens, labels = zip(*batch)
    padded = torch.zeros(len(tokens), max(len(t) for t in tokens), dtype=torch.long)
    for row, ids in enumerate(tokens):
        padded[row, : len(ids)] = torch.tensor(ids)
    return padded, torch.tensor(labels)


def loader(count=256, longest=96):
    return DataLoader(samples(count, longest), batch_size=8, shuffle=True, collate_fn=pad)
'''


@pytest.fixture
def text_data(tmp_path):
    """(MODEL spec, --data spec) of a token classifier and a padded, shuffled loader of variable-length sequences."""
    source = tmp_path / "textdata.py"
    source.write_text(TEXT_DATA)
    return f"{source}:model", f"{source}:loader"


def test_find_with_data_searches_the_largest_samples(capsys, text_data):
    model, data = text_data
    code, out, err = _run(capsys, "find", model, "--data", data, "--device", "sim:2MiB", "--confirm-steps", "0")
    assert code == 0, err
    assert out.startswith(f"dataset: {data} (256 samples)")
    assert "  data: scanned 256 of 256 samples" in out and "largest 97 elements (sample 255)" in out
    assert "confirmed:" not in out  # --confirm-steps 0
    code, out, err = _run(capsys, "find", model, "--data", data, "--device", "sim:2MiB", "--scan-budget", "5", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert found["data_scan"]["varies"] is True and found["data_scan"]["largest_index"] == 255
    assert found["data"] == data and found["targets"] is None and found["confirmations"]
    api = bf.find_batch_size(load_model(model), cli.load_data(data), device="sim:2MiB")
    assert found["max_batch_size"] == api.max_batch_size and found["batch_size"] == api.batch_size


def test_estimate_and_predict_use_the_largest_sample_of_data(capsys, text_data):
    model, data = text_data
    code, out, err = _run(capsys, "estimate", model, "--data", data, "--batch-sizes", "19", "--json")
    assert code == 0, err
    estimate = json.loads(out)["estimates"][0]
    assert "dataset[255]" in estimate["sample"]
    assert estimate["peak"] == bf.estimate_memory(load_model(model), cli.load_data(data), 19).peak
    code, out, err = _run(capsys, "predict", model, "--data", data, "--capacity", "2MiB", "--json")
    assert code == 0, err
    api = bf.predict_max_batch_size(load_model(model), cli.load_data(data), capacity="2MiB")
    assert json.loads(out)["max_batch_size"] == api.max_batch_size


def test_data_and_input_are_exclusive(capsys, text_data):
    model, data = text_data
    for command, extra in (("find", ["--device", "sim:1MiB"]), ("estimate", []), ("predict", ["--capacity", "1MiB"])):
        with pytest.raises(SystemExit) as usage:
            main([command, model, "--data", data, "--input", "8", *extra])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and "argument --input: not allowed with argument --data" in err, err
        with pytest.raises(SystemExit) as usage:
            main([command, model, *extra])
        assert usage.value.code == 2 and "one of the arguments --input --data is required" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["0", "-1", "x", "nan"])
def test_bad_scan_budget_is_an_error_naming_it(capsys, budget):
    with pytest.raises(SystemExit) as usage:
        main(["find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--scan-budget", budget])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --scan-budget: {budget!r}" in err and "seconds" in err


def test_data_errors_are_one_clear_line(capsys, text_data, tmp_path):
    model, data = text_data
    where = data.rsplit(":", 1)[0]
    cases = [
        (["--data", data, "--dtype", "int64"], "--dtype sets the dtype of synthetic --input data"),
        (["--input", "8", "--data-kwargs", "{}"], "--data-kwargs needs --data"),
        (["--data", f"{where}:VOCAB"], f"{where}:VOCAB is a int, not a Dataset or DataLoader or a callable"),
        (["--data", f"{where}:nothing"], "has no attribute 'nothing'"),
        (["--data", data, "--data-kwargs", '{"width": 3}'], "pass arguments with --data-kwargs"),
        (["--data", f"{where}:samples", "--data-kwargs", '{"count": 0}'], "dataset is empty"),
        (["--data", "textdata"], "--data 'textdata' must be package.module:callable"),
    ]
    for extra, message in cases:
        code, out, err = _run(capsys, "estimate", model, "--batch-sizes", "4", *extra)
        assert code == 1 and out == "" and message in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "find", model, "--data", data, "--samples", "10", "--device", "sim:1MiB")
    assert code == 1 and "--samples sizes the synthetic --input data" in err
    with pytest.raises(SystemExit):
        main(["find", model, "--data", data, "--confirm-steps", "-1"])
    assert "argument --confirm-steps: '-1'" in capsys.readouterr().err


def test_data_may_be_a_list_of_samples(capsys, text_data):
    model, data = text_data
    where = data.rsplit(":", 1)[0]
    code, _, err = _run(capsys, "estimate", model, "--data", f"{where}:samples", "--batch-sizes", "4")
    # A list is a data set (not one sample); without the loader's collate_fn its samples cannot be batched.
    assert code == 1 and "dataset[0] is a tuple whose first element is list" in err


def test_precision_is_an_option_of_every_command_and_an_unknown_one_is_refused(capsys):
    from batchfinder.cli import main

    assert main(["predict", "torchvision:resnet18", "--input", "3x64x64", "--capacity", "256MiB", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["max_batch_size"]
    assert main(["predict", "torchvision:resnet18", "--input", "3x64x64", "--capacity", "256MiB", "--json",
                 "--precision", "bf16-mixed"]) == 0
    assert json.loads(capsys.readouterr().out)["max_batch_size"] > full
    with pytest.raises(SystemExit):
        main(["estimate", "torchvision:resnet18", "--input", "3x32x32", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# -- every error in one line (issue 22) -------------------------------------------------------------------------------
FAULTY = '''
import torch
from torch import nn


class Raising(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index == 3:
            raise KeyError("sample 3 is missing")
        return torch.zeros(8), 0


def data():
    return Raising()


def model():
    return nn.Linear(8, 2)


def broken_factory():
    raise RuntimeError("the checkpoint is corrupt\\nmore detail")
'''


@pytest.fixture
def faulty(tmp_path):
    source = tmp_path / "faulty.py"
    source.write_text(FAULTY)
    return str(source)


def _one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("batchfinder find: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_every_error_of_the_users_code_is_one_line_with_its_type(capsys, faulty, tmp_path):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def model(:\n    pass\n")
    raising_module = tmp_path / "raising.py"
    raising_module.write_text("raise RuntimeError('no GPU driver here')\n")
    cases = [
        ([f"{syntax}:model", "--input", "8"], ["SyntaxError", f"{syntax}", "line 1"]),
        ([f"{raising_module}:model", "--input", "8"], ["RuntimeError: no GPU driver here", "importing"]),
        ([f"{faulty}:broken_factory", "--input", "8"], ["RuntimeError: the checkpoint is corrupt", "broken_factory"]),
        ([f"{faulty}:model", "--data", f"{faulty}:data"], ["KeyError", "sample 3 is missing", "sample 3"]),
    ]
    for argv, needles in cases:
        code, out, err = _run(capsys, "find", *argv, "--device", "sim:16MiB")
        _one_line_error(code, out, err, *needles)
        assert out == ""
        code, out, err = _run(capsys, "find", *argv, "--device", "sim:16MiB", "--json")
        _one_line_error(code, out, err, *needles)
        error = json.loads(out)["error"]
        assert error["command"] == "find" and error["type"] == needles[0].split(":")[0]
        assert needles[-1] in error["message"]


def test_a_plot_into_a_missing_directory_is_refused_before_the_search(capsys, monkeypatch, tmp_path):
    searched = []
    monkeypatch.setattr(bf.api, "find_batch_size", lambda *a, **k: searched.append(1))
    target = tmp_path / "no" / "such" / "dir" / "search.png"
    code, out, err = _run(capsys, "find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:64MiB",
                          "--plot", str(target))
    _one_line_error(code, out, err, "--plot", "does not exist")
    assert searched == [] and not target.parent.exists()


def test_usage_errors_are_one_line_and_json_when_asked(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["find", "batchfinder.zoo:mnist_mlp", "--input", "8", "--safety", "x", "--json"])
    assert usage.value.code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "argument --safety" in err
    assert json.loads(out)["error"]["type"] == "usage"


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bf.api, "find_batch_size", interrupted)
    code, out, err = _run(capsys, "find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:64MiB")
    assert code == 130 and err.strip() == "batchfinder find: error: interrupted (Ctrl-C)"


def test_an_unknown_mode_is_bad_usage_with_exit_status_2(capsys):
    from batchfinder.engine.modes import MODES

    assert sorted(cli.FIND_MODES) == sorted(MODES)
    with pytest.raises(SystemExit) as exited:
        main(["find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device", "sim:6MiB", "--mode", "fast"])
    assert exited.value.code == 2  # as docs/cli.md says for bad arguments
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_progress_lines_follow_the_heading():
    done = subprocess.run(
        [sys.executable, "-m", "batchfinder.cli", "find", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--device",
         "sim:6MiB", "--samples", "3000", "--max-trials", "3", "--confirm-steps", "0", "--progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("synthetic data: 3,000 samples"))
    progress = next(i for i, line in enumerate(lines) if line.startswith("searching training batch sizes on"))
    first_trial = next(i for i, line in enumerate(lines) if line.startswith("trial  1:"))
    assert heading < progress < first_trial
    assert sum(line.startswith("synthetic data:") for line in lines) == 1  # not printed again with the result


def test_the_cudnn_workspace_flag_sets_what_convolutions_charge(capsys):
    argv = ["estimate", "torchvision:resnet18", "--input", "3x32x32", "--batch-sizes", "4", "--json"]
    runs = {}
    for setting in ("auto", "none", "64MiB"):
        code, out, _ = _run(capsys, *argv, "--cudnn-workspace", setting)
        assert code == 0
        runs[setting] = json.loads(out)["estimates"][0]
    assert any("input + output bytes" in line for line in runs["auto"]["kernels"])
    assert not any("convolution" in line for line in runs["none"]["kernels"])
    assert any("allowance 67,108,864 B" in line for line in runs["64MiB"]["kernels"])
    assert runs["none"]["peak_reserved"] < runs["64MiB"]["peak_reserved"]
    with pytest.raises(SystemExit):
        main([*argv, "--cudnn-workspace", "lots"])
    assert "--cudnn-workspace" in capsys.readouterr().err


def test_predict_per_gpu_of_a_sharded_job(capsys):
    from batchfinder.estimate import Sharding

    code, out, _ = _run(
        capsys, "predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--capacity", "8MiB", "--world-size", "8",
        "--wrap", "Linear", "--json",
    )
    assert code == 0
    data = json.loads(out)
    api = bf.predict_max_batch_size(
        zoo.mnist_mlp(), (1, 28, 28), capacity="8MiB", sharding=Sharding(8, wrap=torch.nn.Linear)
    )
    assert data["max_batch_size"] == api.max_batch_size
    assert data["estimate"]["sharded"]["world_size"] == 8 and data["estimate"]["sharded"]["units"] == 2
    code, _, err = _run(capsys, "predict", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--capacity", "8MiB", "--world-size", "8", "--wrap", "Conv2d")
    assert code != 0 and "picks no module" in err and "Linear" in err
