"""``pivot-mega plan`` against measurement: the bytes a rank holds, and the bytes a forward saves.

Parameters, gradients and AdamW state are predicted exactly: each layout's prediction is compared,
byte for byte, with the local shards a rank holds after ``parallelize`` and one optimizer step.
Activations are predicted from the shapes and compared with the saved-tensor bytes of one forward
(and loss) on CPU, each storage counted once, within ``ACTIVATION_BOUND``.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pivot_mega.config import ConfigError, to_dict
from pivot_mega.models import VisionLanguageModel
from pivot_mega.parallel import ParallelConfig, build_mesh, lm_loss, parallelize, resolve_layout
from pivot_mega.training import plan
from pivot_mega.training.config import load_run_config
from pivot_mega.training.optim import OptimConfig, apply_trainable, build_optimizer
from tests.distributed import require_procs, run_workers
from tests.parallel.test_equivalence import ROWS, SEQLEN, make_batch, split, tiny_config

# The count leaves out small tensors autograd keeps (the index tensors of the image scatter) and
# counts the head's input as whole rows where the loss keeps labelled positions only: measured
# within 3 % on these models (the tests print the ratio). 5 % still fails a missed block: one
# decoder layer of the tiny model is ~23 % of the total, its SwiGLU's saved tensors ~9 %.
ACTIVATION_BOUND = 0.05


def run_config(stage: str, parallel: ParallelConfig | None = None, **model_kw):
    model = to_dict(tiny_config(**model_kw))
    # The paths are never read: the plan needs the shapes only.
    data = {"mode": "dpo" if stage == "dpo" else "lm", "max_seq_len": SEQLEN, "micro_batch_rows": ROWS,
            "shards": "unused", "tokenizer": "unused"}
    config = load_run_config({"stage": stage, "model": model, "data": data,
                              "dpo": {"reference": "precomputed"}})
    if parallel is not None:
        config.parallel = parallel
    return config


def held_bytes(named_parameters, optimizer) -> dict:
    """Bytes of this rank's local shards: parameters, their gradients, the optimizer's state."""
    def local(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = list(named_parameters)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"params": sum(local(p) for _, p in params),
            "grads": sum(local(p.grad) for _, p in params if p.grad is not None),
            "optimizer": sum(local(v) for v in state)}


def predicted_bytes(config, layout, rank) -> dict:
    e = plan.estimate(config, config.parallel, layout, rank, device_type="cpu")
    return {"params": e.params, "grads": e.grads, "optimizer": e.optimizer}


def one_step(model, trainable, microbatches, dp=1):
    apply_trainable(model, trainable)
    optimizer = build_optimizer(model.named_parameters(), OptimConfig(lr=1e-3), "cpu")
    total = sum(int(mb.targets.positions.numel()) for mb in microbatches) * dp
    if hasattr(model, "forward_backward"):
        model.forward_backward(microbatches, lambda h, w, mb: lm_loss(h, w, mb.targets, total, dp))
    else:
        (mb,) = microbatches
        hidden = model(mb.input_ids, mb.images, packed=mb.packed, return_hidden=True)
        lm_loss(hidden, model.language.head_weight, mb.targets, total).backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("stage", ["pretrain_projector", "pretrain_full", "sft", "dpo"])
def test_state_bytes_exact_one_process(stage):
    config = run_config(stage)
    model = VisionLanguageModel(config.model).init_weights(0)
    optimizer = one_step(model, config.trainable, split(make_batch(config.model, 0, 0), slice(0, ROWS), 1))
    layout = resolve_layout(config.parallel, config.model, 1)
    assert predicted_bytes(config, layout, plan.RankCoords()) == held_bytes(model.named_parameters(), optimizer)


def _layouts_worker(rank, world_size, configs: dict):
    """Every layout in turn on the same ranks (one spawn: starting processes is most of the cost)."""
    out = {}
    for name, config in configs.items():
        dims = build_mesh(config.parallel, config.model, device_type="cpu")
        with torch.device("meta"):
            model = VisionLanguageModel(config.model)
        pmodel = parallelize(model, dims, seed=0, device="cpu")
        dp, n_micro = dims.layout.dp, max(config.parallel.microbatches, 1)
        rows = ROWS // dp
        micro = split(make_batch(config.model, 0, 0), slice(dims.dp_rank * rows, (dims.dp_rank + 1) * rows), n_micro)
        optimizer = one_step(pmodel, config.trainable, micro, dp)
        coords = (dims.pp_rank, dims.mesh["dp_shard"].get_local_rank(), dims.tp_rank)  # plain: torch.load's rules
        out[name] = coords, held_bytes(pmodel.named_parameters(), optimizer)
        dist.barrier()
    return out


LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "fsdp2": ParallelConfig(data_parallel_sharding="fsdp"),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2, microbatches=2),
}


@pytest.mark.slow
@pytest.mark.multiproc
@require_procs(2)
def test_state_bytes_exact_per_rank():
    configs = {name: run_config("sft", parallel) for name, parallel in LAYOUTS.items()}
    # An odd vocabulary: FSDP's chunks of the embedding differ by a row between the two ranks.
    uneven = configs["fsdp2-uneven"] = run_config("sft", ParallelConfig(data_parallel_sharding="fsdp"))
    uneven.model.language.vocab_size = 67
    results = run_workers(_layouts_worker, 2, configs)
    for name, config in configs.items():
        layout = resolve_layout(config.parallel, config.model, 2)
        ranks = [result[name] for result in results]
        for coords, held in ranks:
            print(f"{name} rank {coords}: held {held}")
            assert predicted_bytes(config, layout, plan.RankCoords(*coords)) == held, (name, coords)
        assert ranks[0][0] != ranks[1][0]  # each rank checked against its own share
    held = [result["fsdp2-uneven"][1]["params"] for result in results]
    # one fp32 embedding row more on rank 0 (67 rows: 34 and 33), as predicted
    assert held[0] - held[1] == 4 * uneven.model.language.hidden_size


def test_kv_heads_replicated_when_tp_exceeds_them():
    """tp > num_key_value_heads: K/V projections stay whole on every rank (``ReplicatedKVHeads``)."""
    config = run_config("sft", ParallelConfig(tensor_model_parallel_size=2), kv_heads=1)
    layout = resolve_layout(config.parallel, config.model, 2)
    shapes = dict(plan.parameter_shapes(config.model))
    name = "language.layers.0.self_attn.k_proj.weight"
    assert plan.tp_local_shape(name, shapes[name], 2, 0, config.model) == shapes[name]
    split_q = plan.tp_local_shape(name.replace("k_proj", "q_proj"), shapes[name.replace("k_proj", "q_proj")],
                                  2, 1, config.model)
    assert split_q[0] * 2 == shapes[name.replace("k_proj", "q_proj")][0]
    assert plan.estimate(config, config.parallel, layout, device_type="cpu").params > 0


def saved_bytes(model, mb) -> int:
    """Bytes autograd saves in one forward and loss: each storage once, parameters left out."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(mb.input_ids, mb.images, packed=mb.packed, return_hidden=True)
        loss = lm_loss(hidden, model.language.head_weight, mb.targets, 1)
    del loss
    return sum(storages.values())


@pytest.mark.parametrize("stage", ["pretrain_projector", "sft"])
def test_activation_bytes_within_bound(stage):
    config = run_config(stage)
    model = VisionLanguageModel(config.model).init_weights(0)
    apply_trainable(model, config.trainable)
    (mb,) = split(make_batch(config.model, 0, 0), slice(0, ROWS), 1)
    measured = saved_bytes(model, mb)
    layout = resolve_layout(config.parallel, config.model, 1)
    predicted = plan.activation_bytes(config, config.parallel, layout, plan.RankCoords(), act_bytes=4,
                                      backend="sdpa", images=len(mb.images))
    print(f"{stage}: predicted {predicted} B, measured {measured} B, ratio {predicted / measured:.3f}")
    assert abs(predicted - measured) <= ACTIVATION_BOUND * measured


def test_checkpointing_and_pipeline_scale_activations():
    config = run_config("sft", ParallelConfig(pipeline_model_parallel_size=2, microbatches=4))
    layout = resolve_layout(config.parallel, config.model, 2)
    first, last = (plan.activation_bytes(config, config.parallel, layout, plan.RankCoords(pp=p), act_bytes=4,
                                         backend="sdpa") for p in (0, 1))
    assert first > last  # 1F1B: stage 0 holds pp micro-batches, the last stage one
    checkpointed = dataclasses.replace(config, model=dataclasses.replace(config.model, activation_checkpointing=True))
    assert plan.activation_bytes(checkpointed, config.parallel, layout, plan.RankCoords(), act_bytes=4,
                                 backend="sdpa") < first


def test_candidates_are_what_resolve_layout_accepts():
    config = run_config("sft")
    layouts = plan.candidate_layouts(config, gpus_per_node=8)
    # tiny: 4 heads, 4 decoder layers -> tp in {1, 2, 4}, pp in {1, 2, 4}; dp 1 counted once
    assert {(l.tp, l.pp) for _, l in layouts} == {(t, p) for t in (1, 2, 4) for p in (1, 2, 4) if t * p <= 8}
    for parallel, layout in layouts:
        assert resolve_layout(parallel, config.model, 8) == layout


def test_plan_command(tmp_path, capsys):
    from pivot_mega.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"stage: sft\nmodel: {plan_preset('tiny')}\n"
                    "data: {mode: lm, max_seq_len: 256, shards: x, tokenizer: x}\n")
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--gpus", "4", "--gpu-memory", "1GB", "--set", "data.micro_batch_rows=2",
                 "--images-per-row", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recommendation: tp" in printed and "TFLOP" in printed
    import json
    rows = json.loads(out.read_text())
    assert rows["recommended"] is not None and all(r["total"] > 0 for r in rows["estimates"])
    assert main(["plan", str(path), "--gpu-memory", "lots"]) == 2
    assert "pivot-mega plan: error: --gpu-memory 'lots'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        plan.parse_memory("80 bananas")


def plan_preset(name):
    from pivot_mega.presets import model_preset_path
    return model_preset_path(name)
