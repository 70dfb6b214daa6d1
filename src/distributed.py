"""Several processes under ``torchrun`` (PyTorch DistributedDataParallel), or one alone.

``torchrun --standalone --nproc_per_node=N train_teacher.py ...`` starts N copies of a
train script with RANK, LOCAL_RANK and WORLD_SIZE set; ``setup`` joins them into one
process group (NCCL on CUDA, gloo on the CPU). Without torchrun every function here is a
no-op and nothing changes.

What is global and what belongs to a process:
    --batch-size    the global batch. Every process walks the same (seed, epoch) order of
                    global batches, draws the same crops, flips and mixing partners for the
                    whole batch and trains on its contiguous share of it (``share``), so a
                    run's batches do not depend on how many processes share them.
    gradients       each share's loss is scaled by its size, so DDP's average is the
                    gradient of the global batch's mean loss.
    BatchNorm       statistics of the share, unless --sync-bn (CUDA only).
    decisions       validation logits are gathered from every process, so early stopping,
                    ReduceLROnPlateau and best.pt are decided alike on every rank.
    files, output   rank 0 alone writes files and prints; the others keep stderr.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .cli import ToolError, pick_device


@dataclass(frozen=True)
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_context = Context()


def current() -> Context:
    return _context


def launcher(processes: int) -> list[str]:
    """The command that starts a script with ``processes`` processes on this node:
    torchrun (``python -m torch.distributed.run``) for more than one, else plain Python."""
    if processes > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"]
    return [sys.executable]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, sync_bn: bool = False) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device
    (``auto``/``cuda``: the GPU of LOCAL_RANK; ``cpu``: the CPU, with gloo). Checks
    ``--sync-bn`` before any work: it needs CUDA (and means nothing in one process)."""
    global _context
    if not launched_by_torchrun():
        return pick_device(device_name)
    context = Context(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                      int(os.environ["WORLD_SIZE"]))
    if device_name not in ("auto", "cuda", "cpu"):
        raise ToolError(f"--device {device_name}: under torchrun each process takes the GPU "
                        f"of its LOCAL_RANK; give --device auto, cuda or cpu")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise ToolError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if use_cuda:
        if context.local_rank >= torch.cuda.device_count():
            raise ToolError(f"LOCAL_RANK {context.local_rank} has no GPU (this node has "
                            f"{torch.cuda.device_count()}); lower --nproc_per_node")
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if sync_bn and not use_cuda:
        raise ToolError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA only; on the CPU each "
                        "process keeps the BatchNorm statistics of its share")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            device_id=device if use_cuda else None)
    _context = context
    if not context.is_main:
        # One voice: rank 0 prints the epoch lines; errors (stderr) still show everywhere.
        sys.stdout = open(os.devnull, "w")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _context.enabled:
        dist.barrier()


@contextmanager
def main_process_first():
    """The first process of each node runs the block first (making the split, decoding
    the image cache), the others after it, so a node's files are written once and then
    read. Nodes sharing a folder write identical files (same seed, same images), each by
    an atomic rename."""
    if _context.local_rank != 0:
        barrier()
    yield
    if _context.local_rank == 0:
        barrier()


def share(batch_size: int, context: Context | None = None) -> slice:
    """This process's rows of a global batch: contiguous, sizes differing by at most one."""
    context = context or _context
    base, extra = divmod(batch_size, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return slice(start, start + base + (context.rank < extra))


def share_groups(sizes, context: Context | None = None):
    """This process's rows of a global batch made of consecutive groups (labelled rows,
    then unlabelled ones): its ``share`` of each group, so every process gets both kinds.
    One group gives ``share``'s slice."""
    if len(sizes) == 1:
        return share(sizes[0], context)
    rows, start = [], 0
    for size in sizes:
        part = share(size, context)
        rows.append(torch.arange(start + part.start, start + part.stop))
        start += size
    return torch.cat(rows)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (the tensor lives on this process's device)."""
    if _context.enabled:
        dist.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (row counts may differ); the
    result is on ``tensor``'s device."""
    if not _context.enabled:
        return tensor
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(_context.world_size)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    longest = int(max(size.item() for size in sizes))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:int(size.item())] for part, size in zip(gathered, sizes)]) \
        .to(tensor.device)


def broadcast_buffers(objective: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process. DDP sends them
    before each forward, but the last forward of an epoch updates them from each share;
    after this, every process evaluates, and rank 0 saves, one and the same model."""
    if not _context.enabled:
        return
    frozen = _frozen_names(objective)
    for name, buffer in objective.named_buffers():
        if name not in frozen:
            dist.broadcast(buffer, src=0)


def _frozen_names(objective: nn.Module) -> set[str]:
    """What every process holds alike from the start and nothing trains: the teachers and
    their cached logits. DDP need not send them."""
    return {name for name, _ in [*objective.named_parameters(), *objective.named_buffers()]
            if name.startswith("teachers.") or name == "cached_teacher_logits"}


def wrap_for_training(objective: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module whose forward trains: ``objective`` itself in one process; under torchrun
    a DistributedDataParallel around it that averages the gradients of the student and the
    trained alignment modules (projections, generators). The frozen teachers stay outside:
    DDP neither syncs their weights nor broadcasts their buffers."""
    if not _context.enabled:
        return objective
    if sync_bn:
        objective.student = nn.SyncBatchNorm.convert_sync_batchnorm(objective.student)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        objective, sorted(_frozen_names(objective)))
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None)
