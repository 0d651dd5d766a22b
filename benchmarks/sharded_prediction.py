"""Per-GPU memory of a sharded (FSDP2) GPT-2-small-sized model: batchfinder's prediction against DeepSpeed's ZeRO-3
estimator formula and PyTorch's ``FSDPMemTracker``, at world sizes 8 and 64 (docs/sharded-prediction.md).

    python -m benchmarks.sharded_prediction [--world-sizes 8 64] [--batch-size 8] [--seq-len 1024]

Runs on the CPU in a minute or two: every figure comes from fake tensors (no weights are allocated).
DeepSpeed is not needed: its formula (``estimate_zero3_model_states_mem_needs`` in
``deepspeed/runtime/zero/stage3.py``, no offload) is computed here.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchfinder import predict_max_batch_size
from batchfinder.estimate import Sharding, estimate_memory
from batchfinder.units import format_bytes


class GPT(nn.Module):
    """GPT-2 small's shape: 12 pre-norm blocks of width 768 (12 heads, MLP 3072), a 50,257-token vocabulary, 1,024
    positions, the output head tied to the token embedding: 124 M parameters."""

    def __init__(self, vocab: int = 50257, width: int = 768, depth: int = 12, heads: int = 12, positions: int = 1024):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def language_model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    ids, targets = batch
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def deepspeed_zero3_gpu_bytes(model: nn.Module, gpus: int) -> int:
    """DeepSpeed's per-GPU figure for ZeRO-3 without offload: ``4 * largest_layer_params + 18 * total_params /
    total_gpus`` (``estimate_zero3_model_states_mem_needs``, ``deepspeed/runtime/zero/stage3.py``), with its
    ``model_to_params``: shared parameters counted once, the largest layer the module with most parameters of its
    own (``recurse=False``)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return 4 * largest + int(18 * total / gpus)


def fsdp_mem_tracker_peak(model_factory: Any, world: int, batch_size: int, seq_len: int, policy: Any) -> int | str:
    """PyTorch's ``FSDPMemTracker`` on the same job (fake tensors, fake process group): its peak, or why it did not
    run."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import FakeStore
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    except ImportError as exc:  # pragma: no cover
        return f"not available ({exc})"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with FakeTensorMode():
            model = model_factory()
            for block in model.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            optimizer = torch.optim.Adam(model.parameters(), foreach=True)
            ids = torch.randint(0, 50257, (batch_size, seq_len))
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((ids,))
            with tracker:
                for iteration in range(2):
                    language_model_loss(model, (ids, ids)).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    if iteration == 0:
                        tracker.reset_mod_stats()  # it tracks one iteration at a time
            snapshot = tracker.get_tracker_snapshot("peak")
            return max(int(per_device.get("Total", 0)) for per_device in snapshot.values())
    except Exception as exc:  # it reports what PyTorch's own tool could not do here
        return f"did not run ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--gpu", default=None, help="also predict the largest batch per GPU on it, e.g. H100")
    args = parser.parse_args(argv)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = GPT()
    count = sum({id(p): p.numel() for p in model.parameters()}.values())
    sample = (torch.zeros(args.seq_len, dtype=torch.long), torch.zeros(args.seq_len, dtype=torch.long))
    print(f"GPT-2-small-sized model: {count:,} parameters; batch {args.batch_size} x {args.seq_len} tokens per GPU; "
          "Adam; FSDP2 per block + root, bf16 parameters, fp32 reduction")
    for world in args.world_sizes:
        started = time.perf_counter()
        est = estimate_memory(
            model, sample, args.batch_size, optimizer=torch.optim.Adam, step_fn=language_model_loss,
            sharding=Sharding(world, wrap=nn.TransformerEncoderLayer, mixed_precision=policy),
        )
        seconds = time.perf_counter() - started
        states = est.parameters + est.gradients + est.optimizer_state
        gathered = est.sharded.largest_unit_bytes if est.sharded else 0
        deepspeed = deepspeed_zero3_gpu_bytes(model, world)
        tracker = fsdp_mem_tracker_peak(GPT, world, args.batch_size, args.seq_len, policy)
        tracker_text = format_bytes(tracker) if isinstance(tracker, int) else tracker
        print(f"\nworld size {world} ({seconds:.1f} s)")
        print(f"  batchfinder: shards per rank {format_bytes(states)} (parameters {format_bytes(est.parameters)}, "
              f"gradients {format_bytes(est.gradients)}, optimizer state {format_bytes(est.optimizer_state)}); "
              f"largest unit gathered {format_bytes(gathered)}; gathered at the peak "
              f"{format_bytes(est.sharded.gathered_at_peak if est.sharded else 0)}")
        print(f"  batchfinder: model states + largest unit {format_bytes(states + gathered)}; peak of the step "
              f"{format_bytes(est.peak)} allocated, {format_bytes(est.peak_reserved)} reserved ({est.peak_phase})")
        print(f"  DeepSpeed ZeRO-3 formula (model states only): {format_bytes(deepspeed)}")
        print(f"  PyTorch FSDPMemTracker peak: {tracker_text}")
        if args.gpu:
            started = time.perf_counter()
            prediction = predict_max_batch_size(
                model, sample, gpu=args.gpu, optimizer=torch.optim.Adam, step_fn=language_model_loss,
                sharding=Sharding(world, wrap=nn.TransformerEncoderLayer, mixed_precision=policy),
            )
            print(f"  batchfinder on {args.gpu}: largest batch per GPU {prediction.max_batch_size} (recommended "
                  f"{prediction.batch_size}), peak {format_bytes(prediction.peak_bytes)} reserved; "
                  f"{prediction.traces} trace(s), {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
