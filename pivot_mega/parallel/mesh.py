"""Process group and DeviceMesh from torchrun or SLURM variables, with no wrapper script needed."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError, ModelConfig
from .config import DIM_NAMES, Layout, ParallelConfig, resolve_layout

DEFAULT_PORT = 29500


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits: global rank, world size, local rank, and the rendezvous address."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[003-010,012],login1`` → ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK win; else srun's SLURM_PROCID/NTASKS/LOCALID; else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", 0)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)), launcher="torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        # A port per job, so two jobs sharing a node do not collide.
        port = int(env.get("MASTER_PORT", DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                         local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=addr, master_port=port,
                         launcher="slurm")
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=DEFAULT_PORT,
                     launcher="single")


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with this local rank: the local rank itself, or 0 when the process
    sees a single GPU (srun --gpus-per-task=1 or --gpu-bind give each task its own device 0)."""
    if device_count == 1:
        return 0
    if not 0 <= local_rank < device_count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {device_count}; start one "
                          f"process per GPU (torchrun --nproc-per-node, or srun tasks per node = GPUs per node)")
    return local_rank


def init_distributed(launch: LaunchEnv | None = None, device_type: str | None = None,
                     timeout_s: float = ParallelConfig.timeout_s) -> LaunchEnv:
    """Initialises the default process group (nccl on CUDA, gloo on CPU) if not done already;
    its collectives fail after ``timeout_s`` seconds of waiting for another rank.

    On CUDA the process is bound to its GPU first (every later CUDA call, NCCL's included, runs
    there), and the group is told the device: NCCL then connects the ranks now, not at the first
    collective, and the mesh's sub-groups split from that communicator.
    """
    launch = launch or detect_launch()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    bound = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device_type == "cuda":
        device = torch.device("cuda", cuda_device_index(launch.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        bound["device_id"] = device
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if launch.world_size == 1:
            # One process needs no rendezvous: an in-memory store, so single-process runs on one
            # machine never compete for MASTER_PORT.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **bound)
            return launch
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **bound)
    return launch


@dataclasses.dataclass
class ParallelDims:
    """The mesh and its named groups, as every parallel component sees them."""

    mesh: DeviceMesh
    layout: Layout
    config: ParallelConfig

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group()

    @property
    def tp_group(self):
        return self.mesh["tp"].get_group()

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel sub-mesh FSDP shards over: (dp_replicate, dp_shard) or dp_shard."""
        return self.mesh["dp_replicate", "dp_shard"] if self.layout.dp_replicate > 1 else self.mesh["dp_shard"]

    @property
    def dp_rank(self) -> int:
        replicate = self.mesh["dp_replicate"].get_local_rank()
        return replicate * self.layout.dp_shard + self.mesh["dp_shard"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank()

    @property
    def device_type(self) -> str:
        return self.mesh.device_type


def build_mesh(parallel: ParallelConfig, model: ModelConfig, device_type: str | None = None) -> ParallelDims:
    """Validates the layout against the world (before any work) and builds the 4-D mesh."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    launch = None if dist.is_initialized() else detect_launch()
    world = dist.get_world_size() if launch is None else launch.world_size
    layout = resolve_layout(parallel, model, world)
    if launch is not None:
        init_distributed(launch, device_type=device_type, timeout_s=parallel.timeout_s)
    # The mesh's sub-groups do not inherit the default group's timeout; each is given it.
    options = group_options(device_type, parallel.timeout_s)
    mesh = init_device_mesh(device_type, layout.shape(), mesh_dim_names=DIM_NAMES,
                            backend_override={name: (None, options) for name in DIM_NAMES})
    return ParallelDims(mesh=mesh, layout=layout, config=parallel)


def group_options(device_type: str, timeout_s: float):
    """Backend options of a new process group (nccl on CUDA, gloo on CPU) with this timeout."""
    options = dist.ProcessGroupNCCL.Options() if device_type == "cuda" else dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return options
