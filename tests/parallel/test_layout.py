"""Layout validation (one clear error before any work) and rank discovery from torchrun / SLURM."""

import dataclasses

import pytest

from pivot_mega.config import ConfigError
from pivot_mega.parallel import ParallelConfig, detect_launch, resolve_layout, stage_layer_ranges
from pivot_mega.parallel.mesh import first_host
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
