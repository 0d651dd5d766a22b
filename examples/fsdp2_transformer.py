"""A sharded model: the batch size per GPU for a small transformer sharded with FSDP2 (``fully_shard``).

Every rank builds the same language model (token embedding, 6 transformer blocks, a head over 2,048 tokens), shards
each block and then the whole model with ``torch.distributed.fsdp.fully_shard``, and calls
``batchfinder.find_batch_size`` on it. The trials run the real sharded steps (all-gathers in forward and backward,
reduce-scatters of the gradients, AdamW on the sharded state); all ranks try the same sizes, a size fits only if it
fitted on every rank, and every rank gets the same answer. Then each rank trains 3 steps at the recommended size.

Without CUDA every rank gets a simulated GPU (by default 256 MiB; rank 1 gets 1/6 less with ``--uneven`` to show the
smaller one deciding) and the ranks talk over gloo. The data are random token sequences of 64 tokens (no data set is
downloaded).

    python examples/fsdp2_transformer.py                         # starts 2 ranks itself
    torchrun --nproc-per-node 2 examples/fsdp2_transformer.py    # or let torchrun start them
    python examples/fsdp2_transformer.py --world-size 4 --capacity 128MiB --uneven
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.units import format_bytes, parse_bytes

VOCAB, SEQUENCE, WIDTH, HEADS, BLOCKS = 2048, 64, 256, 4, 6


class TinyLM(nn.Module):
    """A small causal language model: embedding, ``BLOCKS`` pre-norm transformer blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(x.flatten(0, 1))  # (batch x positions, vocabulary): not a view, as FSDP2 asks of an output


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets.flatten())


def sharded_model() -> nn.Module:
    """The same model on every rank (same seed), each block sharded, then the root."""
    torch.manual_seed(0)
    model = TinyLM()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def token_data(samples: int = 4096) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (samples, SEQUENCE + 1), generator=generator)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def run_rank(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device: Any = "cuda"
        capacity = None
    else:
        capacity = args.capacity
        if args.uneven and rank == 1:
            capacity = format_bytes(int(parse_bytes(args.capacity) * 5 // 6))
        device = bf.SimulatedGPU(capacity)
    model = sharded_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = token_data()
    if rank == 0:
        parameters = sum(p.numel() for p in model.parameters())  # DTensors count their global size
        print(f"model:   TinyLM, {parameters:,} parameters, each of {BLOCKS} blocks and the root sharded over {world} ranks")
        print(f"data:    {len(data):,} random sequences of {SEQUENCE} tokens")
    print(f"rank {rank}: device {device.name if isinstance(device, bf.SimulatedGPU) else device}", flush=True)
    result = bf.find_batch_size(
        model, data, optimizer=optimizer, loss_fn=language_model_loss, device=device, max_batch_size=512
    )
    if rank == 0:
        print()
        print(result)
    # The answer is the same on every rank; train a few steps at it (on a fresh simulated GPU without CUDA).
    training_gpu = bf.SimulatedGPU(capacity) if capacity else None
    with training_gpu if training_gpu else contextlib.nullcontext():
        loader = torch.utils.data.DataLoader(data, batch_size=result.batch_size, shuffle=True)
        for _, (tokens, targets) in zip(range(3), loader):
            optimizer.zero_grad()
            loss = language_model_loss(model(tokens), targets)
            loss.backward()
            optimizer.step()
        peak = training_gpu.max_memory_allocated() if training_gpu else torch.cuda.max_memory_allocated()
    print(
        f"rank {rank}: largest {result.max_batch_size}, recommended {result.batch_size}; 3 training steps at "
        f"{result.batch_size} peaked at {format_bytes(peak)} (loss {loss.item():.3f})",
        flush=True,
    )


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_rank(args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="ranks to start when not run by torchrun")
    parser.add_argument("--capacity", default="256MiB", help="simulated GPU memory per rank (without CUDA)")
    parser.add_argument("--uneven", action="store_true", help="give rank 1 a simulated GPU 1/6 smaller")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            run_rank(args)
        finally:
            dist.destroy_process_group()
        return
    if args.world_size < 2:
        sys.exit("--world-size must be at least 2: a sharded model needs several ranks")
    mp.spawn(_worker, args=(args.world_size, _free_port(), args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
