"""The Lightning callback: batchfinder.lightning.BatchFinder on the simulated GPU."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
torchmetrics = pytest.importorskip("torchmetrics")

from pytorch_lightning.loggers.logger import Logger  # noqa: E402

import batchfinder as bf  # noqa: E402
from batchfinder.lightning import BatchFinder  # noqa: E402
from batchfinder.lightning.loaders import rebuild_dataloader  # noqa: E402
from batchfinder.search.strategies import recommend_batch_size  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*litlogger.*")

CAPACITY = "1MiB"


def dataset(n: int = 1024, features: int = 32, classes: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


class MemoryLogger(Logger):
    """Keeps what is logged, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.hyperparameters: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hyperparameters.append(dict(params) if isinstance(params, dict) else {"params": params})


class LitMLP(pl.LightningModule):
    """An MLP classifier that keeps its batch size in an attribute, in hparams, or nowhere (``store=None``)."""

    def __init__(self, batch_size: int = 4, store: str | None = "attr", val_extra: int = 0, features: int = 32,
                 hidden: int = 64) -> None:
        super().__init__()
        if store == "hparams":
            self.save_hyperparameters("batch_size")
        elif store == "attr":
            self.batch_size = batch_size
        self._fixed_batch_size = batch_size
        self.store = store
        self.val_extra = val_extra
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 5))
        self.data = dataset(4096, features=features)
        self.training_steps = 0
        self.train_batch_sizes: list[int] = []
        self.val_batch_sizes: list[int] = []

    def current_batch_size(self) -> int:
        if self.store == "hparams":
            return self.hparams.batch_size
        if self.store == "attr":
            return self.batch_size
        return self._fixed_batch_size

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.training_steps += 1
        x, y = batch
        self.train_batch_sizes.append(len(x))
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_batch_sizes.append(len(x))
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.val_extra:  # validation that needs much more memory per sample than training
            loss = loss + torch.ones(len(x), self.val_extra, device=x.device).sum() * 0
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.current_batch_size(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.current_batch_size())


class HookFreeMLP(LitMLP):
    """Data comes from a datamodule or from loaders passed to fit()."""

    train_dataloader = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]


class DataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4, in_hparams: bool = False) -> None:
        super().__init__()
        if in_hparams:
            self.save_hyperparameters()
        else:
            self.batch_size = batch_size
        self.in_hparams = in_hparams
        self.data = dataset(4096)

    def _size(self) -> int:
        return self.hparams.batch_size if self.in_hparams else self.batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self._size(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self._size())


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=1,
        val_check_interval=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def finder(**kwargs: Any) -> BatchFinder:
    kwargs.setdefault("device", bf.SimulatedGPU(CAPACITY, allocator="ideal"))
    return BatchFinder(**kwargs)


def check_result(result: bf.SearchResult) -> None:
    assert isinstance(result, bf.SearchResult)
    assert result.max_batch_size > 16
    assert result.batch_size == recommend_batch_size(result.max_batch_size, 0.8)
    assert result.trial_for(result.max_batch_size).fits
    if result.mode == "binsearch":  # the bracket closes on this device
        assert result.smallest_failure == result.max_batch_size + 1


# -- where the batch size goes ----------------------------------------------------------------------------------------
def test_model_attribute(tmp_path: Path) -> None:
    model = LitMLP(store="attr")
    callback = finder()
    fit_trainer = trainer(tmp_path, [callback])
    fit_trainer.fit(model)
    check_result(callback.result)
    assert model.batch_size == callback.result.batch_size
    assert fit_trainer.train_dataloader.batch_size == callback.result.batch_size
    assert model.train_batch_sizes == [callback.result.batch_size] * 2  # training used it
    assert model.val_batch_sizes == [callback.result.batch_size] * 2
    assert fit_trainer.accumulate_grad_batches == 1
    assert list(tmp_path.iterdir()) == []  # nothing written to disk


def test_model_hparams(tmp_path: Path) -> None:
    model = LitMLP(store="hparams")
    callback = finder()
    trainer(tmp_path, [callback]).fit(model)
    check_result(callback.result)
    assert model.hparams.batch_size == callback.result.batch_size
    assert model.train_batch_sizes == [callback.result.batch_size] * 2


@pytest.mark.parametrize("in_hparams", [False, True])
def test_datamodule(tmp_path: Path, in_hparams: bool) -> None:
    model = HookFreeMLP(store=None)
    datamodule = DataModule(in_hparams=in_hparams)
    callback = finder()
    trainer(tmp_path, [callback]).fit(model, datamodule=datamodule)
    check_result(callback.result)
    assert datamodule._size() == callback.result.batch_size
    assert model.train_batch_sizes == [callback.result.batch_size] * 2


def test_every_holder_is_updated(tmp_path: Path) -> None:
    model = HookFreeMLP(store="attr", batch_size=3)
    datamodule = DataModule(batch_size=5)
    callback = finder()
    trainer(tmp_path, [callback]).fit(model, datamodule=datamodule)
    assert model.batch_size == datamodule.batch_size == callback.result.batch_size


def test_class_attribute(tmp_path: Path) -> None:
    class ClassLevel(LitMLP):
        batch_size = 8  # read through self.batch_size: the instance attribute set by the callback wins

        def __init__(self) -> None:
            super().__init__(store=None)
            self.store = "attr"

    model = ClassLevel()
    callback = finder()
    trainer(tmp_path, [callback]).fit(model)
    assert model.batch_size == callback.result.batch_size and ClassLevel.batch_size == 8
    assert model.train_batch_sizes[0] == callback.result.batch_size


def _collate(samples: list[Any]) -> Any:
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.stack(ys)


def test_dataloaders_passed_to_fit_are_rebuilt(tmp_path: Path) -> None:
    model = HookFreeMLP(store=None)
    generator = torch.Generator().manual_seed(5)
    train = DataLoader(model.data, batch_size=4, shuffle=True, collate_fn=_collate, drop_last=True, generator=generator)
    val = DataLoader(model.data, batch_size=4, collate_fn=_collate)
    callback = finder()
    fit_trainer = trainer(tmp_path, [callback])
    fit_trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    check_result(callback.result)
    size = callback.result.batch_size
    used = fit_trainer.train_dataloader
    assert isinstance(used, DataLoader) and used is not train
    assert used.batch_size == size and used.drop_last and used.collate_fn is _collate
    assert isinstance(used.sampler, RandomSampler) and used.sampler is train.sampler and used.generator is generator
    assert fit_trainer.val_dataloaders.batch_size == size and fit_trainer.val_dataloaders.collate_fn is _collate
    assert model.train_batch_sizes == [size] * 2 and model.val_batch_sizes == [size] * 2
    assert train.batch_size == 4  # the user's own loader is left alone


def test_rebuild_dataloader_keeps_settings() -> None:
    data = dataset(64)
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(data, batch_size=3, sampler=sampler, num_workers=2, collate_fn=_collate, pin_memory=False,
                        drop_last=True, timeout=5, worker_init_fn=print, prefetch_factor=3, persistent_workers=True)
    rebuilt = rebuild_dataloader(loader, 10)
    assert rebuilt.batch_size == 10 and rebuilt.sampler is sampler and rebuilt.num_workers == 2
    assert rebuilt.collate_fn is _collate and rebuilt.drop_last and rebuilt.timeout == 5
    assert rebuilt.worker_init_fn is print and rebuilt.prefetch_factor == 3 and rebuilt.persistent_workers
    batch_sampled = DataLoader(data, batch_sampler=torch.utils.data.BatchSampler(sampler, 3, drop_last=False))
    assert len(next(iter(rebuild_dataloader(batch_sampled, 7)))[0]) == 7

    class OwnBatches(torch.utils.data.Sampler):
        def __iter__(self) -> Any:
            return iter([[0, 1]])

        def __len__(self) -> int:
            return 1

    with pytest.raises(ValueError, match="custom batch_sampler"):
        rebuild_dataloader(DataLoader(data, batch_sampler=OwnBatches()), 7)


# -- bad input: clear errors before any trial ---------------------------------------------------------------------
def test_no_batch_size_anywhere(tmp_path: Path) -> None:
    model = LitMLP(store=None)
    with pytest.raises(ValueError, match="nowhere to put the batch size"):
        trainer(tmp_path, [finder()]).fit(model)
    assert model.training_steps == 0


def test_batch_arg_name_that_does_not_exist(tmp_path: Path) -> None:
    model = LitMLP(store="attr")
    with pytest.raises(ValueError, match="batch_arg_name='bs' was not found"):
        trainer(tmp_path, [finder(batch_arg_name="bs")]).fit(model)
    assert model.training_steps == 0


@pytest.mark.parametrize("target", [0, -8])
def test_target_batch_size_below_one(target: int) -> None:
    with pytest.raises(ValueError, match="target_batch_size"):
        BatchFinder(device=bf.SimulatedGPU(CAPACITY), target_batch_size=target)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="safety"):
        BatchFinder(safety=1.5)
    with pytest.raises(ValueError, match="stages"):
        BatchFinder(stages=("train",))
    with pytest.raises(ValueError, match="steps_per_trial"):
        BatchFinder(steps_per_trial=1)


def test_cpu_trainer_without_simulated_gpu(tmp_path: Path) -> None:
    model = LitMLP()
    with pytest.raises(ValueError, match="SimulatedGPU"):
        trainer(tmp_path, [BatchFinder()]).fit(model)
    assert model.training_steps == 0


def test_sharded_strategy_is_refused() -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    class FakeTrainer:  # FSDP cannot be built on a CPU-only machine; the check needs only the strategy
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(ValueError, match="FSDPStrategy strategy: it wraps the model in FSDP1.*fully_shard"):
        finder().setup(FakeTrainer(), LitMLP(), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("DeepSpeedStrategy", "DeepSpeed's own autotuner, or shard with FSDP2"),
        ("ModelParallelStrategy", "tensor parallelism.*tensor_parallel_size=1.*find_batch_size"),
    ],
)
def test_other_sharded_strategies_say_what_to_do(strategy: str, expected: str) -> None:
    import pytorch_lightning.strategies as strategies

    class FakeTrainer:  # neither strategy can be set up on a CPU-only machine; the check needs only the class
        pass

    cls = getattr(strategies, strategy)
    FakeTrainer.strategy = cls.__new__(cls)
    with pytest.raises(ValueError, match=expected):
        finder().setup(FakeTrainer(), LitMLP(), "fit")  # type: ignore[arg-type]


# -- validation memory --------------------------------------------------------------------------------------------------
def test_validation_memory_is_respected(tmp_path: Path) -> None:
    """Validation needs ~16 KiB per sample, training ~1 KiB: with validation in the trials, the size found fits a real
    fit (with validation) on the simulated GPU; without it, the size found runs out of memory in validation."""
    capacity = "2MiB"
    results = {}
    for validate in (False, True):
        model = LitMLP(val_extra=4096)
        callback = BatchFinder(device=bf.SimulatedGPU(capacity), validate=validate, safety=1.0)
        trainer(tmp_path, [callback], max_steps=1).fit(model)
        results[validate] = callback.result
    assert results[True].max_batch_size < results[False].max_batch_size / 4

    def real_fit(size: int) -> None:
        model = LitMLP(batch_size=size, val_extra=4096)
        with bf.SimulatedGPU(capacity):
            trainer(tmp_path, [], max_steps=2, val_check_interval=1, limit_val_batches=1).fit(model)

    real_fit(results[True].batch_size)  # fits, validation included
    with pytest.raises(torch.OutOfMemoryError):
        real_fit(results[False].batch_size)


class EvalSized(LitMLP):
    """A module with a separate evaluation batch size, which its validation loader uses."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_batch_size = 4

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.eval_batch_size)


def test_separate_evaluation_batch_size(tmp_path: Path) -> None:
    model = EvalSized()
    callback = finder(eval_batch_size=True)
    trainer(tmp_path, [callback]).fit(model)
    result = callback.result
    check_result(result)
    assert result.evaluation is not None and result.eval_batch_size == result.evaluation.batch_size and result.evaluation.trials
    assert all(t.batch_size >= result.max_batch_size or not t.fits for t in result.evaluation.trials[:1])
    assert result.eval_max_batch_size > result.max_batch_size  # no gradients or activations kept for backward
    assert model.eval_batch_size == result.eval_batch_size == recommend_batch_size(result.eval_max_batch_size)
    assert model.batch_size == result.batch_size
    assert model.val_batch_sizes == [result.eval_batch_size] * 2
    assert "evaluation batch size" in str(result)


def test_train_false_searches_only_the_evaluation_batch_size(tmp_path: Path) -> None:
    model = EvalSized()
    before = model.batch_size
    callback = finder(eval_batch_size=True, train=False)
    trainer(tmp_path, [callback]).fit(model)
    result = callback.result
    assert result.train is False and result.evaluation is None and result.trials
    assert model.eval_batch_size == result.batch_size == recommend_batch_size(result.max_batch_size)
    assert model.batch_size == before  # the training batch size is left alone
    assert model.val_batch_sizes == [result.batch_size] * 2
    with pytest.raises(ValueError, match="pass eval_batch_size=True"):
        BatchFinder(train=False)

# -- no side effects ---------------------------------------------------------------------------------------------------
class RichModule(pl.LightningModule):
    """BatchNorm, dropout, a torchmetrics metric, AdamW with a per-step scheduler, shuffled data, Python/NumPy RNG."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 5))
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=5)
        self.data = dataset(600)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        import random

        x, y = batch
        x = x + 0.01 * random.random()
        out = self.net(x)
        self.accuracy(out, y)
        loss = nn.functional.cross_entropy(out, y)
        self.log("loss", loss)
        self.log("acc", self.accuracy)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def _fit(
    tmp_path: Path, module: pl.LightningModule, callbacks: list[Any], **kwargs: Any
) -> tuple[pl.Trainer, MemoryLogger]:
    memory = MemoryLogger()
    pl.seed_everything(123, verbose=False)
    fit_trainer = trainer(tmp_path, callbacks, logger=memory, max_steps=-1, max_epochs=2, limit_train_batches=4,
                          limit_val_batches=2, log_every_n_steps=1, **kwargs)
    fit_trainer.fit(module)
    return fit_trainer, memory


def test_training_after_the_search_is_identical_to_training_without_it(tmp_path: Path) -> None:
    pl.seed_everything(123, verbose=False)
    searched = RichModule(batch_size=8)
    callback = finder()
    with_trainer, with_logger = _fit(tmp_path, searched, [callback])
    size = callback.result.batch_size
    assert callback.result.num_trials > 5 and searched.batch_size == size

    pl.seed_everything(123, verbose=False)
    plain = RichModule(batch_size=size)
    without_trainer, without_logger = _fit(tmp_path, plain, [])

    assert searched.losses == plain.losses
    assert callback in with_trainer.callbacks and with_trainer.loggers == [with_logger]
    for (name, a), (_, b) in zip(searched.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = with_trainer.optimizers[0].state_dict(), without_trainer.optimizers[0].state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for key in state_a["state"]:
        for name, value in state_a["state"][key].items():
            assert torch.equal(value, state_b["state"][key][name])
    scheduler_a, scheduler_b = (t.lr_scheduler_configs[0].scheduler for t in (with_trainer, without_trainer))
    assert scheduler_a.state_dict() == scheduler_b.state_dict()
    assert with_trainer.global_step == without_trainer.global_step > 2
    assert with_trainer.current_epoch == without_trainer.current_epoch
    assert with_trainer.fit_loop.state_dict() == without_trainer.fit_loop.state_dict()
    assert torch.equal(searched.accuracy.tp, plain.accuracy.tp)
    # The loggers saw the same training metrics; only the search's own entries come in addition.
    training = [(m, s) for m, s in with_logger.metrics if not any(k.startswith("batchfinder") for k in m)]
    assert training == without_logger.metrics
    assert list(tmp_path.iterdir()) == []


def test_a_failed_search_leaves_no_trace(tmp_path: Path) -> None:
    model = LitMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fit_trainer = trainer(tmp_path, [finder(device=bf.SimulatedGPU("24KiB"))])
    with pytest.raises(bf.NoBatchSizeFitsError, match="does not fit"):
        fit_trainer.fit(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.batch_size == 4 and model.training_steps == 0
    assert all(p.grad is None for p in model.parameters())


def test_result_is_logged(tmp_path: Path) -> None:
    memory = MemoryLogger()
    callback = finder()
    trainer(tmp_path, [callback], logger=memory).fit(LitMLP())
    logged = [m for m, _ in memory.metrics if "batchfinder/max_batch_size" in m]
    assert logged and logged[0]["batchfinder/max_batch_size"] == callback.result.max_batch_size
    assert logged[0]["batchfinder/batch_size"] == callback.result.batch_size
    params = [h["batchfinder"] for h in memory.hyperparameters if "batchfinder" in h]
    assert params and params[0]["max_batch_size"] == callback.result.max_batch_size
    table = params[0]["trial_table"].replace(",", "")
    assert "batch size" in table and f" {callback.result.max_batch_size} " in table


# -- what the trials run ------------------------------------------------------------------------------------------------
class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers and two schedulers (a GAN-shaped step)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.batch_size = batch_size
        self.generator = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
        self.critic = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        self.data = dataset(4096, features=32)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_c = self.optimizers()
        sched_g, sched_c = self.lr_schedulers()
        noise = torch.randn(len(real), 16, device=real.device)
        fake = self.generator(noise)
        critic_loss = self.critic(fake.detach()).mean() - self.critic(real).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        opt_c.step()
        sched_c.step()
        generator_loss = -self.critic(self.generator(noise)).mean()
        opt_g.zero_grad()
        self.manual_backward(generator_loss)
        opt_g.step()
        sched_g.step()
        self.log("g", generator_loss)

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-3)
        opt_c = torch.optim.RMSprop(self.critic.parameters(), lr=1e-3, momentum=0.9)
        schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt_g, 0.9), torch.optim.lr_scheduler.StepLR(opt_c, 1)]
        return [opt_g, opt_c], schedulers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def test_manual_optimization_with_two_optimizers_and_schedulers(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    searched = TwoOptimizers()
    callback = finder()
    with_trainer = trainer(tmp_path, [callback], max_steps=3)
    with_trainer.fit(searched)
    check_result(callback.result)
    # Both optimizers' states were charged in the trials: Adam keeps 2 and RMSprop with momentum 2 states per value.
    params = sum(p.numel() * 4 for p in searched.parameters())
    assert callback.result.trial_for(callback.result.max_batch_size).peak_bytes > 4 * params

    pl.seed_everything(0, verbose=False)
    plain = TwoOptimizers(batch_size=callback.result.batch_size)
    without_trainer = trainer(tmp_path, [], max_steps=3)
    without_trainer.fit(plain)
    for (name, a), (_, b) in zip(searched.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    for sa, sb in zip(with_trainer.lr_scheduler_configs, without_trainer.lr_scheduler_configs):
        assert sa.scheduler.state_dict() == sb.scheduler.state_dict()


def test_precision_plugin_is_used(tmp_path: Path) -> None:
    """bf16 autocast halves the activations of the linear layers: the search finds a larger batch size."""
    found = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = finder(safety=1.0)
        trainer(tmp_path, [callback], precision=precision, max_steps=1).fit(LitMLP(hidden=512))
        found[precision] = callback.result.max_batch_size
    assert found["bf16-mixed"] > 1.2 * found["32-true"]


def test_target_batch_size_sets_gradient_accumulation(tmp_path: Path) -> None:
    model = LitMLP()
    callback = finder(target_batch_size=1000)
    fit_trainer = trainer(tmp_path, [callback], max_steps=1)
    fit_trainer.fit(model)
    result = callback.result
    assert result.batch_size < 1000
    assert result.micro_batch_size <= result.batch_size
    assert result.micro_batch_size * result.accumulation_steps == result.effective_batch_size >= 1000
    assert fit_trainer.accumulate_grad_batches == result.accumulation_steps > 1
    assert model.batch_size == result.micro_batch_size
    assert model.train_batch_sizes == [result.micro_batch_size] * result.accumulation_steps  # one optimizer step


def test_target_batch_size_needs_automatic_optimization(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer(tmp_path, [finder(target_batch_size=64)]).fit(TwoOptimizers())


def test_test_stage_search(tmp_path: Path) -> None:
    class Tested(LitMLP):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.val_batch_sizes.append(len(batch[0]))

        def test_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=self.batch_size)

    model = Tested()
    callback = finder(stages=("test",))
    trainer(tmp_path, [callback], limit_test_batches=2).test(model)
    result = callback.results["test"]
    assert result.max_batch_size > 16 and model.batch_size == result.batch_size
    assert len(model.val_batch_sizes) == 2 and model.val_batch_sizes[0] == result.batch_size
    assert model.training_steps == 0


def test_only_the_lightning_module_imports_lightning() -> None:
    root = Path(bf.__file__).parent
    importers = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"^\s*(import|from) (pytorch_)?lightning", p.read_text(), re.M)
    )
    assert importers == ["lightning/framework.py"]  # the one place the subpackage takes Lightning's names from
    assert "batchfinder.lightning" not in sys.modules or "pytorch_lightning" in sys.modules


def test_callback_result_is_a_copy_free_search_result(tmp_path: Path) -> None:
    """callback.result is the function's SearchResult type with the same arithmetic and trial table."""
    callback = finder(mode="power", multiple_of=8)
    trainer(tmp_path, [callback]).fit(LitMLP())
    result = callback.result
    assert result.mode == "power" and result.batch_size % 8 == 0
    assert result.batch_size == recommend_batch_size(result.max_batch_size, 0.8, 8)
    assert str(result).startswith("batch size search on SimulatedGPU(1.00 MiB, allocated bytes only)")
    assert copy.copy(result).trials == result.trials


def test_lightning_example_runs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "BATCHFINDER_DATA": str(tmp_path / "no-cifar-here"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "examples/lightning_cifar10.py", "--device", "sim:32MiB", "--max-steps", "2"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "FakeData with CIFAR-10's shape" in out and "SimulatedGPU(32.00 MiB)" in out
    recommended = int(out.split("recommended batch size: ")[1].split()[0])
    largest = int(out.split("largest that fits: ")[1].split(";")[0])
    assert recommended == int(0.8 * largest) and largest > 300
    assert f"training: 2 steps at batch size {recommended}," in out
    percent = int(out.split("of the simulated GPU")[0].rsplit("(", 1)[1].split("%")[0])
    assert percent <= 100  # the real training run at the recommended size fitted on the simulated GPU (reserved bytes)
    assert list(tmp_path.iterdir()) == []


# -- on_oom="split" -----------------------------------------------------------------------------------------------------
def _guarded_fit(tmp_path: Path, capacity: str, on_oom: str | None) -> tuple[LitMLP, BatchFinder]:
    """Three steps at a batch size of 1,024 set by hand (no search: the finder only guards), dropout off."""
    torch.manual_seed(0)
    model = LitMLP(batch_size=1024, hidden=512)
    model.net[2].p = 0.0
    gpu = bf.SimulatedGPU(capacity)
    callback = BatchFinder(device=gpu, on_oom=on_oom, stages=("validate",))
    torch.manual_seed(1)
    with gpu:
        trainer(tmp_path, [callback], max_steps=3, limit_val_batches=0).fit(model)
    return model, callback


def test_on_oom_split_redoes_the_batch_in_micro_batches_and_trains_as_unsplit(tmp_path: Path) -> None:
    with pytest.raises(torch.OutOfMemoryError):
        _guarded_fit(tmp_path, "6MiB", None)
    guarded, callback = _guarded_fit(tmp_path, "6MiB", "split")
    reference, _ = _guarded_fit(tmp_path, "1GiB", None)
    assert callback.guard is not None and callback.guard.splits == 1 and callback.guard.micro_batch_size == 512
    assert guarded.train_batch_sizes == [1024] + [512] * 6  # the failed attempt, then 2 micro-batches per step
    assert guarded.trainer.global_step == reference.trainer.global_step == 3  # no step lost or repeated
    difference = max((a - b).abs().max().item() for a, b in zip(guarded.parameters(), reference.parameters()))
    assert difference < 1e-6
    assert "training_step" not in vars(guarded) and "backward" not in vars(guarded)  # removed after fit


def test_on_oom_refuses_what_lightnings_loop_cannot_redo(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_oom='maybe'"):
        BatchFinder(on_oom="maybe")
    model = LitMLP(batch_size=64)
    callback = BatchFinder(device=bf.SimulatedGPU("1GiB"), on_oom="split", stages=("validate",))
    with pytest.raises(ValueError, match="accumulate_grad_batches=1, not 2"):
        trainer(tmp_path, [callback], max_steps=1, limit_val_batches=0, accumulate_grad_batches=2).fit(model)
    assert model.training_steps == 0


def test_on_oom_is_refused_before_the_search_when_training_would_accumulate(tmp_path: Path) -> None:
    model = LitMLP(batch_size=64)
    callback = finder(on_oom="split", target_batch_size=2000)
    with pytest.raises(ValueError, match="target_batch_size reaches its target with gradient accumulation"):
        trainer(tmp_path, [callback], max_steps=1).fit(model)
    callback = finder(on_oom="split")
    with pytest.raises(ValueError, match="accumulate_grad_batches=1, not 2"):
        trainer(tmp_path, [callback], max_steps=1, accumulate_grad_batches=2).fit(model)
    assert callback.result is None and model.training_steps == 0 and model.batch_size == 64  # no search ran


class AccumulationEvents(LitMLP):
    """Records the order of Lightning's hooks: 'fwd' (training_step), 'zero' (optimizer_zero_grad), 'step'
    (optimizer_step)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.events.append("fwd")
        return super().training_step(batch, batch_idx)

    def optimizer_zero_grad(self, *args: Any, **kwargs: Any) -> None:
        self.events.append("zero")
        super().optimizer_zero_grad(*args, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.events.append("step")
        super().optimizer_step(*args, **kwargs)


def _window(steps: int) -> list[str]:
    """Lightning's hooks over one optimizer step of ``steps`` micro-batches: the gradients zeroed after the first
    forward only, the optimizer stepping (its closure running the forward) at the last."""
    return ["fwd", "zero"] + ["fwd"] * (steps - 2) + ["step", "fwd"]


def _contains(events: list[str], window: list[str]) -> bool:
    return any(events[i:i + len(window)] == window for i in range(len(events) - len(window) + 1))


def test_target_batch_size_plan_is_measured_with_lightnings_accumulation(tmp_path: Path) -> None:
    model = AccumulationEvents()
    callback = finder(target_batch_size=1000)
    trainer(tmp_path, [callback], max_steps=1).fit(model)
    result = callback.result
    steps = result.accumulation_steps
    assert steps > 1
    measured = result.accumulation_trials[-1]
    assert measured.fits and measured.batch_size == result.micro_batch_size
    assert measured.micro_batches == steps  # the confirmation runs the whole plan
    assert _contains(model.events, _window(steps))


def test_the_trainers_own_accumulate_grad_batches_is_measured(tmp_path: Path) -> None:
    model = AccumulationEvents()
    callback = finder(confirm_steps=0)
    trainer(tmp_path, [callback], max_steps=1, accumulate_grad_batches=3).fit(model)
    result = callback.result
    assert result.target_batch_size is None and result.accumulation_steps == 3
    assert result.accumulation_trials[-1].fits and result.accumulation_trials[-1].micro_batches == 2
    assert _contains(model.events, ["fwd", "zero", "fwd"])  # a second micro-batch with the gradients kept
    assert model.batch_size == result.micro_batch_size == result.batch_size


def test_result_records_the_trainers_precision(tmp_path: Path) -> None:
    callback = finder()
    trainer(tmp_path, [callback], precision="bf16-mixed", max_steps=1).fit(LitMLP())
    assert callback.result.precision == "bf16-mixed"
    assert "precision bf16-mixed" in str(callback.result).splitlines()[0]
