"""Writing a search's result to the trainer's loggers: metrics and hyperparameters under ``batchfinder/``."""

from __future__ import annotations

from ..result import SearchResult
from .framework import pl

__all__ = ["log_result"]


def log_result(trainer: pl.Trainer, result: SearchResult, stage: str) -> None:
    """Log ``result`` (of the search for ``stage``) to every logger of ``trainer``: the sizes, trials and seconds as
    metrics at the current step, the settings and the trial table as hyperparameters."""
    prefix = "batchfinder" if stage == "fit" else f"batchfinder/{stage}"
    metrics: dict[str, float] = {
        f"{prefix}/max_batch_size": float(result.max_batch_size),
        f"{prefix}/batch_size": float(result.batch_size),
        f"{prefix}/trials": float(result.num_trials),
        f"{prefix}/seconds": float(result.seconds),
    }
    if result.target_batch_size is not None:
        metrics[f"{prefix}/micro_batch_size"] = float(result.micro_batch_size)
        metrics[f"{prefix}/accumulate_grad_batches"] = float(result.accumulation_steps)
        metrics[f"{prefix}/effective_batch_size"] = float(result.effective_batch_size)
    if result.evaluation is not None:
        metrics[f"{prefix}/eval_max_batch_size"] = float(result.evaluation.max_batch_size)
        metrics[f"{prefix}/eval_batch_size"] = float(result.evaluation.batch_size)
    hyperparameters = {
        prefix: {
            "max_batch_size": result.max_batch_size,
            "batch_size": result.batch_size,
            "safety": result.safety,
            "mode": result.mode,
            "device": result.device,
            "stop_reason": result.stop_reason.value,
            "trial_table": result.table(),
        }
    }
    if result.data_scan is not None and result.data_scan.varies:
        hyperparameters[prefix]["data"] = result.data_scan.describe()
    for lightning_logger in trainer.loggers:
        lightning_logger.log_hyperparams(hyperparameters)
        lightning_logger.log_metrics(metrics, step=trainer.global_step)
