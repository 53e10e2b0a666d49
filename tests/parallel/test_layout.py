"""Layout validation (one clear error before any work) and rank discovery from torchrun / SLURM."""

import dataclasses
import datetime

import pytest

from pivot_mega.config import ConfigError
from pivot_mega.parallel import ParallelConfig, detect_launch, resolve_layout, stage_layer_ranges
from pivot_mega.parallel.mesh import LaunchEnv, cuda_device_index, first_host, init_distributed
from tests.parallel.test_equivalence import tiny_config


def test_layouts_resolve_to_mesh_sizes():
    config = tiny_config()
    layout = resolve_layout(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                           microbatches=2), config, 16)
    assert (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp) == (2, 1, 4, 2)
    layout = resolve_layout(ParallelConfig(data_parallel_sharding="replicate"), config, 8)
    assert (layout.dp_replicate, layout.dp_shard) == (8, 1)
    layout = resolve_layout(ParallelConfig(data_parallel_replicate_size=2), config, 8)  # HSDP
    assert (layout.dp_replicate, layout.dp_shard) == (2, 4)


@pytest.mark.parametrize("parallel, model_changes, world, message", [
    (dict(tensor_model_parallel_size=3), {}, 6,
     r"model.language.num_attention_heads 4 is not divisible by tensor_model_parallel_size 3"),
    (dict(tensor_model_parallel_size=4), {}, 6, r"tensor_model_parallel_size 4 x pipeline_model_parallel_size 1 = 4 "
                                                r"does not divide the world size 6"),
    (dict(tensor_model_parallel_size=4), dict(num_key_value_heads=1, num_attention_heads=4), 4, None),
    (dict(tensor_model_parallel_size=2), dict(num_key_value_heads=3, num_attention_heads=6, hidden_size=36), 2,
     r"num_key_value_heads 3 and tensor_model_parallel_size 2: one must divide the other"),
    (dict(pipeline_model_parallel_size=3, microbatches=3), {}, 3,
     r"num_hidden_layers 4 cannot be split evenly into 3 pipeline stages"),
    (dict(pipeline_model_parallel_size=2, pipeline_layout=[1, 2], microbatches=2), {}, 2,
     r"pipeline_layout \[1, 2\] must give 2 stages"),
    (dict(sequence_parallel=True), {}, 2, r"sequence_parallel needs tensor_model_parallel_size > 1"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_stages=2, microbatches=2), {}, 2,
     r"virtual_pipeline_stages 2 needs pipeline_schedule: interleaved_1f1b"),
    (dict(pipeline_model_parallel_size=2), {}, 2, r"microbatches 1 must be >= pipeline_model_parallel_size 2"),
    (dict(data_parallel_replicate_size=3), {}, 4, r"data_parallel_replicate_size 3 does not divide the data-parallel"),
    (dict(tensor_model_parallel_size=0), {}, 2, r"tensor_model_parallel_size must be >= 1"),
])
def test_impossible_layouts_are_refused(parallel, model_changes, world, message):
    config = tiny_config()
    config.language = dataclasses.replace(config.language, **model_changes)
    if message is None:
        resolve_layout(ParallelConfig(**parallel), config, world)  # tp > kv heads: replicated, allowed
        return
    with pytest.raises(ConfigError, match=message):
        resolve_layout(ParallelConfig(**parallel), config, world)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        resolve_layout(ParallelConfig(tensor_model_parallel_size=3, pipeline_model_parallel_size=3,
                                      microbatches=3), tiny_config(), 9)
    assert "num_attention_heads 4" in str(info.value) and "cannot be split evenly" in str(info.value)


def test_stage_layer_ranges():
    assert stage_layer_ranges(ParallelConfig(pipeline_model_parallel_size=2), 8) == [range(0, 4), range(4, 8)]
    interleaved = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_stages=2)
    assert stage_layer_ranges(interleaved, 8) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    custom = ParallelConfig(pipeline_model_parallel_size=2, pipeline_layout=[3, 5])
    assert stage_layer_ranges(custom, 8) == [range(0, 3), range(3, 8)]


def test_ranks_from_torchrun_and_slurm():
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node7",
                              "MASTER_PORT": "1234", "SLURM_PROCID": "9"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.master_addr) == ("torchrun", 3, 8, "node7")
    slurm = detect_launch({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                           "SLURM_JOB_NODELIST": "gpu[003-004]"})
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("slurm", 9, 16, 1)
    assert slurm.master_addr == "gpu003" and slurm.master_port == 29500 + 4242
    single = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (single.launcher, single.world_size) == ("single", 1)


@pytest.mark.parametrize("nodelist, host", [("gpu[003-010,012]", "gpu003"), ("node1,node2", "node1"),
                                            ("a-b[7]", "a-b7"), ("solo", "solo")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_each_process_takes_the_gpu_of_its_local_rank():
    assert cuda_device_index(3, 8) == 3
    assert cuda_device_index(5, 1) == 0  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    with pytest.raises(ConfigError, match="local rank 4 has no GPU: this process sees 4"):
        cuda_device_index(4, 4)


@pytest.mark.parametrize("device_type, world_size", [("cuda", 8), ("cuda", 1), ("cpu", 8)])
def test_the_default_group_is_bound_to_the_gpu_before_it_starts(monkeypatch, device_type, world_size):
    """No GPU or peers here: torch's calls are stood in for, and what they were given recorded."""
    import torch
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # set, then removed: the test's end restores them as they were
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    launch = LaunchEnv(rank=world_size - 1, world_size=world_size, local_rank=world_size - 1, master_addr="node7",
                       master_port=1234, launcher="torchrun" if world_size > 1 else "single")
    init_distributed(launch, device_type=device_type)
    gpu = torch.device("cuda", world_size - 1)
    if device_type == "cpu":
        assert calls == [("gloo", {"rank": 7, "world_size": 8, "timeout": datetime.timedelta(seconds=600)})]
        return
    assert calls[0] == ("set_device", gpu)  # before the group: NCCL's communicator is made on this GPU
    backend, kwargs = calls[1]
    assert backend == "nccl" and kwargs["device_id"] == gpu and kwargs["world_size"] == world_size
