"""Every parallel layout trains like one process: 3 AdamW steps, same losses (<= 1e-5 rel), same grads."""

import pytest
import torch
import torch.distributed as dist

from pivot_mega.config import LanguageConfig, ModelConfig, VisionConfig
from pivot_mega.models import VisionLanguageModel
from pivot_mega.batch import MicroBatch, PackedSeqs, Targets
from pivot_mega.parallel import ParallelConfig, build_mesh, lm_loss, parallelize
from tests.distributed import run_workers

STEPS, ROWS, SEQLEN = 3, 4, 24
TOL = 1e-5


def tiny_config(kv_heads=2, tie=True, activation_checkpointing=False, checkpoint_every=1) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                            image_size=16, patch_size=8, select_layer=-2),
        language=LanguageConfig(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=10000.0,
                                max_position_embeddings=128, tie_word_embeddings=tie),
        image_token_id=63, attention="sdpa", activation_checkpointing=activation_checkpointing,
        checkpoint_every=checkpoint_every)


def make_batch(config: ModelConfig, seed: int, step: int):
    """ROWS packed rows of SEQLEN: per row 1-2 samples, some with an image (row 3 has none)."""
    gen = torch.Generator().manual_seed(seed * 100 + step)
    t = config.num_image_tokens
    ids = torch.randint(0, config.image_token_id, (ROWS, SEQLEN), generator=gen)
    positions, images = [], []
    layouts = [[(10, True), (14, True)], [(SEQLEN, True)], [(9, False), (15, True)], [(11, False), (13, False)]]
    for row, segments in enumerate(layouts):
        start, pos = 0, []
        for length, with_image in segments:
            if with_image:
                ids[row, start + 1:start + 1 + t] = config.image_token_id
                images.append(torch.randn(3, 16, 16, generator=gen))
            pos += list(range(length))
            start += length
        positions.append(pos)
    labels = torch.randint(0, config.language.vocab_size, (ROWS, SEQLEN), generator=gen)
    labels[torch.rand(ROWS, SEQLEN, generator=gen) < 0.3] = -100
    labels[ids == config.image_token_id] = -100
    images_per_row = [sum(w for _, w in segments) for segments in layouts]
    return ids, torch.tensor(positions), torch.stack(images), labels, images_per_row


def split(batch, rows: slice, n_micro: int) -> list[MicroBatch]:
    ids, positions, pixels, labels, per_row = batch
    starts = [0]
    for count in per_row:
        starts.append(starts[-1] + count)
    row_ids = list(range(ROWS))[rows]
    step = len(row_ids) // n_micro
    out = []
    for k in range(n_micro):
        r = row_ids[k * step:(k + 1) * step]
        pix = pixels[starts[r[0]]:starts[r[-1] + 1]]
        out.append(MicroBatch(ids[r], PackedSeqs.from_position_ids(positions[r]), Targets.from_dense(labels[r]), pix))
    return out


def reference_run(config: ModelConfig, seed: int):
    model = VisionLanguageModel(config).init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, first_grads = [], None
    for step in range(STEPS):
        batch = make_batch(config, seed, step)
        total = int((batch[3] != -100).sum())
        (mb,) = split(batch, slice(0, ROWS), 1)
        hidden = model(mb.input_ids, mb.images, packed=mb.packed, return_hidden=True)
        loss = lm_loss(hidden, model.language.head_weight, mb.targets, total)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, first_grads


def _reduce_over_dp(value: torch.Tensor, dims) -> torch.Tensor:
    for name in ("dp_replicate", "dp_shard"):
        if dims.mesh[name].size() > 1:
            dist.all_reduce(value, group=dims.mesh[name].get_group())
    return value


def _parallel_worker(rank, world_size, parallel: ParallelConfig, config: ModelConfig, seed: int):
    dims = build_mesh(parallel, config, device_type="cpu")
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    pmodel = parallelize(model, dims, seed=seed, device="cpu")
    optimizer = torch.optim.AdamW(pmodel.parameters(), lr=1e-2, weight_decay=0.1)
    dp, dp_rank = dims.layout.dp, dims.dp_rank
    rows = ROWS // dp
    n_micro = max(parallel.microbatches, 1)
    losses, grads = [], {}
    for step in range(STEPS):
        batch = make_batch(config, seed, step)
        total = int((batch[3] != -100).sum())
        micro = split(batch, slice(dp_rank * rows, (dp_rank + 1) * rows), n_micro)
        loss = pmodel.forward_backward(micro, lambda h, w, mb: lm_loss(h, w, mb.targets, total, dp)).loss
        losses.append((_reduce_over_dp(loss.clone(), dims) / dp).item())
        if step == 0:
            for name, param in pmodel.named_parameters():
                grad = param.grad
                if grad is None:
                    raise RuntimeError(f"no gradient for {name} on rank {rank}")
                grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


LAYOUTS = {
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2), {}),
    "tp2-sp": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), {}),
    "tp2-kv-replicated-sp": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
                             {"kv_heads": 1, "tie": False}),
    "pp2-1f1b": (2, ParallelConfig(pipeline_model_parallel_size=2, microbatches=2), {}),
    "pp2-interleaved": (2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_stages=2,
                                          pipeline_schedule="interleaved_1f1b", microbatches=4), {}),
    "pp2-untied-layout": (2, ParallelConfig(pipeline_model_parallel_size=2, microbatches=4,
                                            pipeline_layout=[1, 3]), {"tie": False}),
    "fsdp2": (2, ParallelConfig(data_parallel_sharding="fsdp"), {}),
    "fsdp2-no-reshard-2micro": (2, ParallelConfig(reshard_after_forward=False, microbatches=2), {}),
    "replicate2": (2, ParallelConfig(data_parallel_sharding="replicate"), {}),
    "compiled-blocks": (1, ParallelConfig(compile=True), {}),
    "tp2-sp-checkpointed": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
                                 {"activation_checkpointing": True}),
    "tp2-pp2": (4, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                  sequence_parallel=True, microbatches=2), {}),
    "tp2-fsdp2": (4, ParallelConfig(tensor_model_parallel_size=2), {}),
    "pp2-fsdp2": (4, ParallelConfig(pipeline_model_parallel_size=2, microbatches=2), {"tie": False}),
    "pp2-fsdp2-checkpointed-every-2": (4, ParallelConfig(pipeline_model_parallel_size=2, microbatches=2),
                                       {"tie": False, "activation_checkpointing": True, "checkpoint_every": 2}),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, seed):
    procs, parallel, model_kw = LAYOUTS[name]
    config = tiny_config(**model_kw)
    ref_losses, ref_grads = reference_run(config, seed)
    results = run_workers(_parallel_worker, procs, parallel, config, seed)
    worst_loss, worst_grad = 0.0, 0.0
    seen = set()
    # Relative to each tensor's largest gradient, floored at 1e-4 of the largest gradient anywhere:
    # some true gradients are exactly 0 (SigLIP's key bias: softmax ignores a shift shared by all keys)
    # and their computed values are rounding noise, in one process as in many.
    floor = 1e-4 * max(g.abs().max().item() for g in ref_grads.values())
    for losses, grads in results:
        for got, want in zip(losses, ref_losses):
            worst_loss = max(worst_loss, abs(got - want) / abs(want))
        for param_name, grad in grads.items():
            seen.add(param_name)
            want = ref_grads[param_name]
            scale = max(want.abs().max().item(), floor)
            worst_grad = max(worst_grad, (grad - want).abs().max().item() / scale)
    print(f"{name}: max loss rel err {worst_loss:.2e}, max grad rel err {worst_grad:.2e}")
    assert seen == set(ref_grads)
    assert worst_loss <= TOL
    assert worst_grad <= TOL
