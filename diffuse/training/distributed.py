"""Data-parallel set-up: read the launcher's environment (torchrun's, else Slurm's), init the process group.

torchrun (one node or many, c10d rendezvous) sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Inside a Slurm allocation whose tasks are the processes (`srun` with one task per GPU, or submitit's
launcher), the same values come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, with the first host of
SLURM_JOB_NODELIST as master, as submitit's TorchDistributedEnvironment does; torchrun's win where both exist.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM_JOB_NODELIST → hosts: "gpu[01-03,07],login2" → gpu01, gpu02, gpu03, gpu07, login2."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def use_slurm_environment() -> bool:
    """Inside a multi-task Slurm step with no torchrun variables: export torchrun's from Slurm's. Returns
    whether it did."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 \
            or "SLURM_PROCID" not in os.environ:
        return False
    hosts = slurm_hostnames(os.environ.get("SLURM_JOB_NODELIST", "")) or ["127.0.0.1"]
    os.environ.setdefault("MASTER_ADDR", hosts[0])
    # one port per job, so two jobs sharing a node do not collide (submitit derives it from the job id too)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    return True


def launched_rank_world() -> tuple[int, int]:
    """(rank, world size) the launcher gave this process (torchrun's, else Slurm's variables)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


def init_distributed(device: torch.device, timeout_min: float = 60) -> tuple[DistInfo, torch.device]:
    """Init the default process group when the launcher started several processes (nccl on CUDA, else gloo).

    Returns the process's DistInfo and its device: on CUDA each process takes GPU LOCAL_RANK, selected
    before the process group starts so that nccl binds to it. `timeout_min` bounds every collective: rank 0
    draws the sample grids alone while the others wait at a barrier, so it must outlast the longest grid."""
    use_slurm_environment()
    rank, world = launched_rank_world()
    if world <= 1:
        return DistInfo(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=float(timeout_min)))
    global _control_group  # every rank creates it, in the same order, right after the default group
    _control_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=float(timeout_min)))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world), device


# A CPU (gloo) group beside the default one for the loop's per-step agreement (stop or go): through nccl, the
# flag would be a GPU tensor whose value the host must wait for after every step. Made on the CPU too, so the
# one code path is the tested one.
_control_group = None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    global _control_group
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()  # every group, the control group too
    _control_group = None


def all_gather_object(obj, info: DistInfo) -> list:
    """[rank 0's obj, rank 1's, …] on every rank; [obj] without a process group."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj, info: DistInfo) -> list | None:
    """[rank 0's obj, rank 1's, …] on rank 0, None on the others; [obj] without a process group. Through the
    CPU control group: CPU tensors travel pickled over gloo, never through a GPU's memory."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0, group=_control_group)
    return out


def all_reduce_max(value: int, info: DistInfo) -> int:
    """The largest `value` over all ranks (every rank gets it); `value` without a process group. On the CPU
    through the control group: it never waits for a GPU."""
    if not info.enabled:
        return value
    box = torch.tensor([value])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_control_group)
    return int(box.item())
