"""find_trainer_batch_size: the Hugging Face Trainer as a front end over the engine, on a simulated GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import batchfinder as bf  # noqa: E402
from batchfinder.engine.workload import Workload  # noqa: E402
from batchfinder.hf import trainer as bft  # noqa: E402
from batchfinder.hf.trainer import find_trainer_batch_size  # noqa: E402
from batchfinder.hf.workload import trainer_precision  # noqa: E402
from tests.helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CAPACITY = "64MiB"
VOCAB = 500


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def text_dataset(count: int = 192, *, shortest: int = 8, longest: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Token-id lists from ``shortest`` to ``longest`` tokens, short ones first, with a class label each."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        length = shortest + (longest - shortest) * i // max(count - 1, 1)
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2})
    return samples


def padding_collator() -> Any:
    """``DataCollatorWithPadding`` with a word-level tokenizer built offline (its batches are BatchEncodings)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )
    return transformers.DataCollatorWithPadding(tokenizer)


class Recording:
    """A collator that remembers how many samples each batch had."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.sizes.append(len(features))
        return self.inner(features)


def make_trainer(tmp_path: Path, *, train: Any = "default", eval_dataset: Any = None, collator: Any = None,
                 optimizers: Any = (None, None), **arguments: Any) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=8, **arguments,
    )
    return transformers.Trainer(
        model=tiny_bert(), args=args, train_dataset=text_dataset() if train == "default" else train,
        eval_dataset=eval_dataset, data_collator=collator or padding_collator(), optimizers=optimizers,
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_search_sets_the_arguments_and_training_runs_at_that_size(tmp_path):
    collator = Recording(padding_collator())
    trainer = make_trainer(tmp_path, collator=collator, max_steps=3)
    before, rng = weights(trainer.model), torch.get_rng_state()
    registered = len(trainer.accelerator._dataloaders)

    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", target_batch_size=64)

    assert result.data_scan is not None and result.data_scan.varies
    assert 1 <= result.micro_batch_size <= result.batch_size < result.max_batch_size < 192
    args = trainer.args
    assert args.per_device_train_batch_size == result.micro_batch_size
    assert args.gradient_accumulation_steps == result.accumulation_steps
    assert result.micro_batch_size * result.accumulation_steps >= 64
    assert trainer._train_batch_size == result.micro_batch_size
    # The search left no trace on the model, the random generator or the Trainer.
    after = weights(trainer.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    assert len(trainer.accelerator._dataloaders) == registered
    assert all(p.grad is None for p in trainer.model.parameters())

    collator.sizes.clear()
    with bf.SimulatedGPU(CAPACITY):  # the found size trains on the GPU it was searched for
        trainer.train()
    assert trainer.state.global_step == 3
    assert max(collator.sizes) == result.micro_batch_size
    assert len(collator.sizes) >= 3 * result.accumulation_steps


def test_without_a_target_accumulation_is_left_alone(tmp_path):
    trainer = make_trainer(tmp_path, gradient_accumulation_steps=3)
    result = find_trainer_batch_size(trainer, device=bf.SimulatedGPU(CAPACITY), confirm_steps=0)
    assert trainer.args.per_device_train_batch_size == result.batch_size
    assert trainer.args.gradient_accumulation_steps == 3
    assert trainer.args.per_device_eval_batch_size == 8  # no eval dataset: the default stays


def test_the_plan_and_the_trainers_own_accumulation_are_measured_with_accumulation(tmp_path):
    trainer = make_trainer(tmp_path)
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", target_batch_size=256)
    assert result.accumulation_steps > 1
    measured = result.accumulation_trials[-1]
    assert measured.fits and (measured.batch_size, measured.micro_batches) == (
        result.micro_batch_size, result.accumulation_steps)

    trainer = make_trainer(tmp_path, gradient_accumulation_steps=3)
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0)
    assert result.accumulation_steps == 3 and result.accumulation_trials[-1].micro_batches == 2
    assert trainer.args.per_device_train_batch_size == result.batch_size == result.micro_batch_size


def test_an_eval_dataset_gets_its_own_batch_size(tmp_path):
    trainer = make_trainer(tmp_path, eval_dataset=text_dataset(96, seed=1), max_steps=1)
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0)
    assert result.evaluation is not None and result.eval_batch_size is not None
    assert trainer.args.per_device_eval_batch_size == result.eval_batch_size
    assert result.eval_max_batch_size >= result.max_batch_size  # no gradients or activations kept for backward
    with bf.SimulatedGPU(CAPACITY):
        metrics = trainer.evaluate()
    assert "eval_loss" in metrics


def test_train_false_searches_only_the_eval_batch_size(tmp_path):
    trainer = make_trainer(tmp_path, eval_dataset=text_dataset(96, seed=1), max_steps=1)
    train_size = trainer.args.per_device_train_batch_size
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", train=False, confirm_steps=0)
    assert result.train is False and result.evaluation is None
    assert trainer.args.per_device_eval_batch_size == result.batch_size
    assert trainer.args.per_device_train_batch_size == train_size
    with pytest.raises(ValueError, match="no eval_dataset"):
        find_trainer_batch_size(make_trainer(tmp_path), device=f"sim:{CAPACITY}", train=False)

def _guarded_run(tmp_path: Path, capacity: str, guarded: bool) -> tuple[Any, Any]:
    """Three Trainer steps at batch size 64 (dropout off, so that split and unsplit steps compute the same)."""
    from batchfinder.transformers import install_oom_guard

    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.args.per_device_train_batch_size = 64
    trainer._train_batch_size = trainer.args.train_batch_size
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gpu = bf.SimulatedGPU(capacity)
    guard = install_oom_guard(trainer, device=gpu) if guarded else None
    with gpu:
        trainer.train()
    return trainer, guard


def test_the_oom_guard_redoes_a_trainer_step_in_micro_batches(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        _guarded_run(tmp_path, "48MiB", guarded=False)
    guarded, guard = _guarded_run(tmp_path, "48MiB", guarded=True)
    reference, _ = _guarded_run(tmp_path, "1GiB", guarded=False)
    assert guard.splits >= 1 and guard.micro_batch_size < 64
    assert guarded.state.global_step == reference.state.global_step == 3  # no step lost or repeated
    difference = max((a - b).abs().max().item() for a, b in zip(guarded.model.parameters(), reference.model.parameters()))
    assert difference < 1e-6
    guard.remove()
    assert "training_step" not in vars(guarded)


def test_the_oom_guard_refuses_gradient_accumulation(tmp_path):
    from batchfinder.transformers import install_oom_guard

    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        install_oom_guard(make_trainer(tmp_path, gradient_accumulation_steps=2))

def test_several_eval_datasets_are_searched_as_one(tmp_path):
    evaluation = {"short": text_dataset(24, longest=40, seed=2), "long": text_dataset(24, shortest=150, seed=3)}
    trainer = make_trainer(tmp_path, train=text_dataset(64), eval_dataset=evaluation)
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0)
    assert result.evaluation.data_scan.total == 48 and result.evaluation.data_scan.largest_size == 2 * 200 + 1
    assert trainer.args.per_device_eval_batch_size == result.eval_batch_size


def test_trials_get_plain_dict_batches(tmp_path):
    from batchfinder.hf.workload import training_source

    trainer = make_trainer(tmp_path, train=text_dataset(16))
    batch = training_source(trainer, None, 10.0).batch(4)  # DataCollatorWithPadding returns a BatchEncoding
    assert type(batch) is dict and batch["input_ids"].shape == (4, 200)


def test_search_eval_false_leaves_the_eval_size(tmp_path):
    trainer = make_trainer(tmp_path, eval_dataset=text_dataset(32, seed=1), per_device_eval_batch_size=5)
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", eval_batch_size=False, confirm_steps=0)
    assert result.evaluation is None
    assert trainer.args.per_device_eval_batch_size == 5


def test_the_trainers_own_optimizer_is_used_and_kept(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=text_dataset(64),
                                   data_collator=padding_collator(), optimizers=(optimizer, None))
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0)
    assert trainer.optimizer is optimizer and not optimizer.state
    assert result.batch_size >= 1


@pytest.mark.skipif(not hasattr(Workload, "precision"), reason="the engine has no precision option yet")
def test_bf16_arguments_search_in_bf16_mixed(tmp_path, monkeypatch):
    seen: list[Workload] = []
    real_search = bft.search

    def spying(workload: Workload, device: Any, options: Any) -> Any:
        seen.append(workload)
        return real_search(workload, device, options)

    monkeypatch.setattr(bft, "search", spying)
    trainer = make_trainer(tmp_path, train=text_dataset(64), bf16=True)
    find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0, max_trials=3)
    assert seen[0].precision == "bf16-mixed"


def test_precision_names():
    assert trainer_precision(types.SimpleNamespace(fp16=True, bf16=False)) == "16-mixed"
    assert trainer_precision(types.SimpleNamespace(fp16=False, bf16=True)) == "bf16-mixed"
    assert trainer_precision(types.SimpleNamespace(fp16=False, bf16=False)) == "32-true"


def test_gradient_checkpointing_is_on_for_the_search_and_put_back(tmp_path, monkeypatch):
    seen: list[bool] = []
    real_search = bft.search

    def spying(workload: Workload, device: Any, options: Any) -> Any:
        seen.append(any(getattr(m, "gradient_checkpointing", False) for m in workload.model.modules()))
        return real_search(workload, device, options)

    monkeypatch.setattr(bft, "search", spying)
    plain = find_trainer_batch_size(make_trainer(tmp_path, train=text_dataset(96)), device=f"sim:{CAPACITY}",
                                     confirm_steps=0)
    fields = transformers.TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    trainer = make_trainer(tmp_path, train=text_dataset(96), **{name: True})
    hooks = {name: dict(m._forward_hooks) for name, m in trainer.model.named_modules()}
    checkpointed = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0)
    assert seen == [False, True]
    assert checkpointed.max_batch_size > plain.max_batch_size
    assert any("checkpointing" in note for note in checkpointed.notes)
    assert not any(vars(m).get("gradient_checkpointing") for m in trainer.model.modules())
    assert {name: dict(m._forward_hooks) for name, m in trainer.model.named_modules()} == hooks


class ColumnDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset``-like table: rows by index, columns by name, with a length column."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = [{**row, "length": len(row["input_ids"])} for row in rows]
        self.column_names = list(self.rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> Any:
        return [row[key] for row in self.rows] if isinstance(key, str) else self.rows[key]


def test_a_length_column_gives_the_sample_sizes(tmp_path):
    trainer = make_trainer(tmp_path, train=ColumnDataset(text_dataset(64)))
    result = find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}", confirm_steps=0, max_trials=3)
    assert result.data_scan.measure == "sample_size" and result.data_scan.largest_size == 200


def test_auto_find_batch_size_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, auto_find_batch_size=True)
    with pytest.raises(ValueError, match="auto_find_batch_size"):
        find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}")


@pytest.mark.parametrize(
    "sharding, expected",
    [
        ({"is_deepspeed_enabled": True}, "DeepSpeed.*autotuner.*fully_shard"),
        ({"is_fsdp_enabled": True, "fsdp_config": {"version": 1}}, "FSDP1.*half-gathered.*fully_shard"),
        ({"is_fsdp_enabled": True, "fsdp_config": {"version": 2}}, "FSDP2, but only inside train.*find_batch_size"),
    ],
)
def test_a_sharding_trainer_is_refused_with_what_to_do(tmp_path, sharding, expected):
    """DeepSpeed and both FSDP versions are refused before any trial, each saying why and what to do instead; the
    model is not touched."""
    trainer = make_trainer(tmp_path)
    before = weights(trainer.model)
    config = sharding.pop("fsdp_config", None)
    for name, value in sharding.items():
        setattr(trainer, name, value)
    if config is not None:
        trainer.accelerator.state.fsdp_plugin = type("Plugin", (), {"fsdp_version": config["version"]})()
    try:
        with pytest.raises(ValueError, match=expected):
            find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}")
    finally:
        if config is not None:
            trainer.accelerator.state.fsdp_plugin = None
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_trainer_without_training_data_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, train=None, eval_dataset=text_dataset(16))
    with pytest.raises(ValueError, match="no train_dataset"):
        find_trainer_batch_size(trainer, device=f"sim:{CAPACITY}")


def test_only_a_trainer_is_accepted():
    with pytest.raises(TypeError, match="transformers.Trainer"):
        find_trainer_batch_size(tiny_bert(), device=f"sim:{CAPACITY}")


def test_a_cpu_trainer_needs_a_device(tmp_path):
    with pytest.raises(ValueError, match="SimulatedGPU"):
        find_trainer_batch_size(make_trainer(tmp_path))


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"batchfinder\[transformers\]"):
        find_trainer_batch_size(object())


def test_the_package_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import batchfinder, batchfinder.hf.trainer\n"
        "print('transformers' in sys.modules and sys.modules['transformers'] is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


_RANK_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import tests.frontends.test_transformers as t
from batchfinder.hf.trainer import find_trainer_batch_size
trainer = t.make_trainer(__import__("pathlib").Path({out!r}), train=t.text_dataset(96, seed=int(os.environ["RANK"])))
result = find_trainer_batch_size(trainer, device="sim:{capacity}", target_batch_size=64, confirm_steps=0)
print(json.dumps([result.world_size, result.max_batch_size, result.micro_batch_size, result.accumulation_steps,
                  trainer.args.per_device_train_batch_size]))
"""


@pytest.mark.slow
def test_two_ranks_agree_on_one_size(tmp_path):
    script = _RANK_SCRIPT.format(root=str(ROOT), out=str(tmp_path), capacity=CAPACITY)
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]
    world, largest, micro, steps, written = eval(outputs[0])  # noqa: S307 - our own JSON list
    assert world == 2 and written == micro and micro * steps * 2 >= 64 and largest >= micro


def test_the_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "examples/hf_text_classification.py", "--device", "sim:48MiB", "--target", "32",
         "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "42,530 parameters" in out and "recommended batch size:" in out
    micro = int(out.split("per_device_train_batch_size=")[1].split(",")[0])
    steps = int(out.split("gradient_accumulation_steps=")[1].split(",")[0])
    assert micro * steps >= 32 and "trained 1 optimizer steps" in out
