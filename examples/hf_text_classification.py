"""A Hugging Face Trainer's batch size: find it with batchfinder, then train at it.

A small BERT built from a config (BertForSequenceClassification: vocabulary 500, hidden size 32, 2 layers, 2 heads;
nothing is downloaded) on synthetic text: token sequences of 8 to 200 tokens, padded to the longest of each batch by
DataCollatorWithPadding. ``find_trainer_batch_size`` runs real training steps with the Trainer's own model, loader,
optimizer and loss on the longest sequences, searches an evaluation batch size as well, plans gradient accumulation
toward ``--target`` samples per optimizer step and writes the sizes into ``trainer.args``; then ``trainer.train()``
runs a few steps at them. On a machine with CUDA the search and the training run on the GPU; otherwise on a
simulated GPU of 64 MiB (``--device sim:CAPACITY``).

    python examples/hf_text_classification.py [--device cuda | sim:64MiB] [--target 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from typing import Any

import torch

import batchfinder as bf
from batchfinder.devices.resolve import resolve_device
from batchfinder.hf.trainer import find_trainer_batch_size
from batchfinder.report import ProgressPrinter

VOCAB = 500


def text_dataset(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` token sequences from 8 to 200 tokens long, short ones first, each with a class label."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        length = 8 + 192 * i // (count - 1)
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2})
    return samples


def padding_collator() -> Any:
    """DataCollatorWithPadding around a word-level tokenizer built here (no download)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )
    return transformers.DataCollatorWithPadding(tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (the Trainer's GPU) or sim:CAPACITY (default: CUDA if "
                        "present, otherwise a simulated GPU of 64MiB)")
    parser.add_argument("--target", type=int, default=64, help="samples per optimizer step to reach (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="training steps after the search (default 3)")
    args = parser.parse_args()
    on_gpu = (args.device is None and torch.cuda.is_available()) or (args.device or "").startswith("cuda")
    device = args.device or ("cuda" if on_gpu else "sim:64MiB")
    torch.set_num_threads(1)  # small operations: one thread is the fastest on a busy CPU

    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(42)
    model = transformers.BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = transformers.TrainingArguments(
            output_dir=output_dir, use_cpu=not on_gpu, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, max_steps=args.steps, per_device_train_batch_size=8,
        )
        trainer = transformers.Trainer(
            model=model, args=training_args, train_dataset=text_dataset(512, seed=0),
            eval_dataset=text_dataset(128, seed=1), data_collator=padding_collator(),
        )
        trainer.remove_callback(transformers.PrinterCallback)  # this script prints its own summary
        print(f"model:   BERT from a config, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{training_args.optim.value if hasattr(training_args.optim, 'value') else training_args.optim}")
        print("data:    512 training and 128 evaluation sequences of 8-200 tokens, padded per batch")
        print(f"device:  {device}" + ("" if on_gpu else " (a GPU of that size simulated on the CPU)"))
        print("trials (the Trainer's loss, backward and optimizer step on the longest sequences):")
        # On a GPU the Trainer's own device is searched (device=None); on the CPU a simulated GPU.
        result = find_trainer_batch_size(trainer, device=None if on_gpu else device, target_batch_size=args.target,
                                         progress=ProgressPrinter(sys.stdout))
        print()
        print(result)
        print()
        print(f"trainer.args: per_device_train_batch_size={training_args.per_device_train_batch_size}, "
              f"gradient_accumulation_steps={training_args.gradient_accumulation_steps}, "
              f"per_device_eval_batch_size={training_args.per_device_eval_batch_size}")
        # On the CPU, train inside a fresh simulated GPU of the same size: the found sizes fit it.
        searched = None if on_gpu else resolve_device(device)
        simulated = (
            bf.SimulatedGPU(searched.capacity_bytes, allocator=searched.allocator)
            if isinstance(searched, bf.SimulatedGPU) else None
        )
        with simulated if simulated is not None else contextlib.nullcontext():
            output = trainer.train()
        peak = f"; peak simulated GPU memory {simulated.max_memory_allocated() / 2**20:.1f} MiB" if simulated else ""
        print(f"trained {output.global_step} optimizer steps of {training_args.per_device_train_batch_size} x "
              f"{training_args.gradient_accumulation_steps} samples{peak}")


if __name__ == "__main__":
    main()
