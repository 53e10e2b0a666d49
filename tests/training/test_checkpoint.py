"""Training checkpoints: exact resume, resume on other layouts, portable export and import, clear errors."""

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from pivot_mega.models import CheckpointError, VisionLanguageModel, save_model
from pivot_mega.parallel import ParallelConfig, build_mesh, lm_loss, parallelize
from pivot_mega.training import (export_model, load_checkpoint, load_model_weights, resolve_resume,
                                 save_checkpoint)
from pivot_mega.training.checkpoint import async_save_group
from tests.distributed import run_workers
from tests.parallel import test_equivalence
from tests.parallel.test_equivalence import ROWS, _reduce_over_dp, make_batch, split, tiny_config

TOL = 1e-5  # losses of different layouts vs one process, as in tests/parallel/test_equivalence.py


def _build(parallel: ParallelConfig, config, seed):
    dims = build_mesh(parallel, config, device_type="cpu")
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    return parallelize(model, dims, seed=seed, device="cpu")


def _train(pmodel, optimizer, config, seed, steps, scheduler=None) -> list[float]:
    """AdamW steps on make_batch(config, seed, step), each rank on its rows → global mean losses."""
    dims = pmodel.dims
    dp, rows = dims.layout.dp, ROWS // dims.layout.dp
    losses = []
    for step in steps:
        batch = make_batch(config, seed, step)
        total = int((batch[3] != -100).sum())
        micro = split(batch, slice(dims.dp_rank * rows, (dims.dp_rank + 1) * rows), dims.config.microbatches)
        loss = pmodel.forward_backward(micro, lambda h, w, mb: lm_loss(h, w, mb.targets, total, dp)).loss
        losses.append((_reduce_over_dp(loss.clone(), dims) / dp).item())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
    return losses


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _full_state(pmodel, optimizer) -> dict[str, torch.Tensor]:
    """Whole parameters and AdamW state of this rank, read from the modules and the optimizer directly
    (not through the checkpoint code): ``param.<name>``, ``exp_avg.<name>``, ``exp_avg_sq.<name>``, ``step.<name>``."""
    state = {}
    for name, param in pmodel.named_parameters():
        state[f"param.{name}"] = _full(param)
        for key, value in optimizer.state[param].items():
            state[f"{key}.{name}"] = _full(value)
    return state


def _merge_ranks(states: list[dict]) -> dict[str, torch.Tensor]:
    """One dict from every rank's; names held by several ranks (replicas, the tied embedding of two
    pipeline stages) must agree exactly."""
    merged = {}
    for state in states:
        for key, value in state.items():
            if key in merged:
                assert torch.equal(merged[key], value), f"ranks disagree on {key}"
            merged[key] = value
    return merged


def _max_diff(got: dict, want: dict) -> float:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


# ----------------------------------------------------------------------------------------------
# exact continuation


def _seed_rngs(value: int) -> None:
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def _rng_draws() -> dict:
    return {"torch": torch.rand(4), "python": random.random(), "numpy": float(np.random.rand())}


def _continuation_worker(rank, world_size, config, seed, out_dir, phase):
    # Two parameter groups and a warmup schedule: a resume that lost either would change the losses.
    pmodel = _build(ParallelConfig(), config, seed if phase == "first" else seed + 1)
    vision = [p for n, p in pmodel.named_parameters() if n.startswith("vision.")]
    rest = [p for n, p in pmodel.named_parameters() if not n.startswith("vision.")]
    optimizer = torch.optim.AdamW([{"params": vision, "lr": 5e-3}, {"params": rest}], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    if phase == "first":
        _seed_rngs((seed + 1000 * rank) % 2**32)  # a different stream per rank
        for step in (0, 1, 2):
            _train(pmodel, optimizer, config, seed, [step], scheduler)
            pending = save_checkpoint(out_dir, step=step + 1, pmodel=pmodel, optimizer=optimizer, scheduler=scheduler,
                                      extra_state={"data": {"rank": rank, "next_row": (step + 1) * ROWS}},
                                      config_dict={"seed": seed, "stage": "sft"}, keep_last=2, async_save=step == 2)
        draws = _rng_draws()
        # Training goes on while the step-3 checkpoint is written in the background.
        losses = _train(pmodel, optimizer, config, seed, [3, 4, 5], scheduler)
        pending.wait()
        return {"losses": losses, "draws": draws}
    _seed_rngs(12345)
    loaded = load_checkpoint(resolve_resume(out_dir, "auto"), pmodel=pmodel, optimizer=optimizer, scheduler=scheduler)
    draws = _rng_draws()
    losses = _train(pmodel, optimizer, config, seed, [3, 4, 5], scheduler)
    return {"losses": losses, "draws": draws, "step": loaded.step, "extra_state": loaded.extra_state,
            "config": loaded.config, "rng_restored": loaded.rng_restored}


@pytest.mark.multiproc
def test_resume_continues_bitwise(tmp_path, seed):
    """FSDP=2: 3 steps, async save, 3 more vs fresh processes loading that save and running 3 steps."""
    config = tiny_config()
    (tmp_path / "checkpoints" / "step_000007.tmp").mkdir(parents=True)  # another writer's: left alone
    first = run_workers(_continuation_worker, 2, config, seed, tmp_path, "first")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step_000002", "step_000003", "step_000007.tmp"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    resumed = run_workers(_continuation_worker, 2, config, seed, tmp_path, "resume")
    for rank, (straight, again) in enumerate(zip(first, resumed)):
        print(f"rank {rank}: straight {straight['losses']}, resumed {again['losses']}")
        assert again["losses"] == straight["losses"]  # bitwise
        assert torch.equal(again["draws"]["torch"], straight["draws"]["torch"])
        assert again["draws"]["python"] == straight["draws"]["python"]
        assert again["draws"]["numpy"] == straight["draws"]["numpy"]
        assert again["step"] == 3 and again["rng_restored"]
        assert again["extra_state"] == {"data": {"rank": rank, "next_row": 3 * ROWS}}
        assert again["config"] == {"seed": seed, "stage": "sft"}
    assert first[0]["draws"]["python"] != first[1]["draws"]["python"]  # the ranks' streams differ


# ----------------------------------------------------------------------------------------------
# resume on other layouts, portable import and export

CHAIN = [
    ("pp2-interleaved", 2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_stages=2,
                                          pipeline_schedule="interleaved_1f1b", microbatches=4), [0, 1, 2]),
    ("tp2", 2, ParallelConfig(tensor_model_parallel_size=2), [3]),
    ("fsdp2", 2, ParallelConfig(), [4]),
    ("single", 1, ParallelConfig(), [5]),
]


def _chain_worker(rank, world_size, config, seed, work, index):
    name, _, parallel, steps = CHAIN[index]
    imported = _build(parallel, config, None)  # left uninitialised: the portable checkpoint fills it
    load_model_weights(imported, work / "init")
    imported_params = {f"param.{n}": _full(p) for n, p in imported.named_parameters()}
    pmodel = imported if index == 0 else _build(parallel, config, seed + 1)  # different values, all overwritten
    optimizer = torch.optim.AdamW(pmodel.parameters(), lr=1e-2, weight_decay=0.1)
    resumed = None
    if index > 0:
        resumed = load_checkpoint(resolve_resume(work / CHAIN[index - 1][0], "auto"), pmodel=pmodel,
                                  optimizer=optimizer)
        resumed = (resumed.step, resumed.saved_world_size, resumed.rng_restored)
    loaded = _full_state(pmodel, optimizer)
    losses = _train(pmodel, optimizer, config, seed, steps)
    save_checkpoint(work / name, step=steps[-1] + 1, pmodel=pmodel, optimizer=optimizer, keep_last=1)
    export_model(pmodel, work / f"{name}-export")
    return {"imported": imported_params, "loaded": loaded, "final": _full_state(pmodel, optimizer), "losses": losses,
            "resumed": resumed}


@pytest.mark.multiproc
def test_resume_on_other_layouts_and_portable_checkpoints(tmp_path, seed, monkeypatch):
    """One training run of 6 steps through four layouts: PP=2 (interleaved, tied embedding held by two
    stages) → TP=2 → FSDP=2 → one process, a checkpoint between each. Every load gives exactly the
    state that was saved; the losses are those of one process training straight through."""
    config = tiny_config()
    reference = VisionLanguageModel(config).init_weights(seed)
    save_model(reference, tmp_path / "init")
    monkeypatch.setattr(test_equivalence, "STEPS", 6)
    reference_losses, _ = test_equivalence.reference_run(config, seed)

    initial = {f"param.{n}": p.detach() for n, p in reference.named_parameters()}
    previous_final = None
    for index, (name, procs, _, steps) in enumerate(CHAIN):
        results = run_workers(_chain_worker, procs, config, seed, tmp_path, index)
        import_diff = _max_diff(_merge_ranks([r["imported"] for r in results]), initial)  # load_model_weights
        loaded = _merge_ranks([r["loaded"] for r in results])
        final = _merge_ranks([r["final"] for r in results])
        # Parameters, exp_avg, exp_avg_sq and step as the previous layout saved them.
        diff = _max_diff(loaded, initial if index == 0 else previous_final)
        worst_loss = max(abs(got - want) / abs(want)
                         for got, want in zip(results[0]["losses"], [reference_losses[s] for s in steps]))
        exported = VisionLanguageModel.from_checkpoint(tmp_path / f"{name}-export")
        export_diff = _max_diff({f"param.{n}": p for n, p in exported.named_parameters()},
                                {k: v for k, v in final.items() if k.startswith("param.")})
        print(f"{name}: import max abs diff {import_diff:.1e}, resume max abs diff {diff:.1e}, loss rel err "
              f"{worst_loss:.1e}, export max abs diff {export_diff:.1e}")
        assert import_diff == 0.0
        assert diff == 0.0
        assert worst_loss <= TOL
        assert export_diff == 0.0
        if index > 0:  # RNG streams are restored only into a world of the size that saved them
            saved_world = CHAIN[index - 1][1]
            assert results[0]["resumed"] == (steps[0], saved_world, saved_world == procs)
        previous_final = final

    # Both pipeline stages held the tied embedding; the checkpoint has it once, as one whole chunk.
    metadata = dcp.FileSystemReader(tmp_path / "pp2-interleaved" / "checkpoints" / "step_000003").read_metadata()
    chunks = metadata.state_dict_metadata["model.language.embed_tokens.weight"].chunks
    assert [list(c.sizes) for c in chunks] == [[config.language.vocab_size, config.language.hidden_size]]


# ----------------------------------------------------------------------------------------------
# one process: the directory protocol and the errors


def _model_and_optimizer(config, seed):
    model = VisionLanguageModel(config).init_weights(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def test_latest_pointer_pruning_and_resume_resolution(tmp_path, seed):
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    root = tmp_path / "checkpoints"
    assert resolve_resume(tmp_path, "none") is None
    assert resolve_resume(tmp_path, "auto") is None  # nothing saved yet: a fresh start
    (root / "step_000009.tmp").mkdir(parents=True)  # incomplete, or another writer's
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, step=step, pmodel=model, optimizer=optimizer, keep_last=2).wait()
        assert path == root / f"step_{step:06d}"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003", "step_000009.tmp"]
    assert resolve_resume(tmp_path, "auto") == root / "step_000003"
    assert resolve_resume(tmp_path, str(root / "step_000002")) == root / "step_000002"

    # A step saved again (after resuming from an earlier one) replaces the old directory.
    with torch.no_grad():
        model.projector.linear_1.bias.fill_(7.0)
    save_checkpoint(tmp_path, step=2, pmodel=model, optimizer=optimizer, keep_last=2)
    assert (root / "latest").read_text().strip() == "step_000002"
    fresh, fresh_optimizer = _model_and_optimizer(tiny_config(), seed + 1)
    load_checkpoint(root / "step_000002", pmodel=fresh, optimizer=fresh_optimizer)
    assert torch.equal(fresh.projector.linear_1.bias, torch.full_like(fresh.projector.linear_1.bias, 7.0))

    (root / "latest").unlink()  # interrupted between the rename and the pointer: newest complete one
    assert resolve_resume(tmp_path, "auto") == root / "step_000003"
    (root / "latest").write_text("step_000005\n")  # a bad pointer: the newest good one, or refused
    assert resolve_resume(tmp_path, "auto") == root / "step_000003"
    with pytest.raises(CheckpointError, match=r"latest names 'step_000005', which is not a checkpoint directory"
                                              r"(.|\n)*train.resume_fallback=true"):
        resolve_resume(tmp_path, "auto", fallback=False)
    with pytest.raises(CheckpointError, match=r"step_000004 does not exist"):
        resolve_resume(tmp_path, str(root / "step_000004"))
    with pytest.raises(CheckpointError, match=r"step_000009.tmp: incomplete or not a training checkpoint"):
        resolve_resume(tmp_path, str(root / "step_000009.tmp"))


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path, seed):
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    path = save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer).wait()
    wider = tiny_config()
    wider.language.intermediate_size = 64
    other, other_optimizer = _model_and_optimizer(wider, seed)
    with pytest.raises(CheckpointError, match=r"tensor language.layers.0.mlp.gate_proj.weight has shape \[56, 32\], "
                                              r"the config expects \[64, 32\]"):
        load_checkpoint(path, pmodel=other, optimizer=other_optimizer)
    untied, untied_optimizer = _model_and_optimizer(tiny_config(tie=False), seed)
    with pytest.raises(CheckpointError, match=r"missing tensor language.lm_head.weight \(expected shape \[64, 32\]\)"):
        load_checkpoint(path, pmodel=untied, optimizer=untied_optimizer)
    # Weights only, then asked for the optimizer state as well.
    weights = save_checkpoint(tmp_path / "weights", step=1, pmodel=model, optimizer=None).wait()
    with pytest.raises(CheckpointError, match=r"holds no optimizer state"):
        load_checkpoint(weights, pmodel=model, optimizer=optimizer)
    # The portable format, into a model of another shape.
    save_model(model, tmp_path / "portable")
    with pytest.raises(CheckpointError, match=r"tensor language.layers.0.mlp.up_proj.weight has shape \[56, 32\], "
                                              r"the config expects \[64, 32\]"):
        load_model_weights(other, tmp_path / "portable")


def test_damaged_checkpoints_are_named(tmp_path, seed):
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    path = save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer).wait()
    (path / ".metadata").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointError, match=r"step_000001/.metadata: cannot read the checkpoint's metadata"):
        load_checkpoint(path, pmodel=model, optimizer=optimizer)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step_000001: incomplete checkpoint, no DCP metadata file"):
        load_checkpoint(path, pmodel=model, optimizer=optimizer)
    (path / "checkpoint.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"checkpoint.json: corrupt"):
        load_checkpoint(path, pmodel=model, optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*step_000002 does not exist"):
        load_checkpoint(path.with_name("step_000002"), pmodel=model, optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"extra_state of rank 0 must be JSON-able"):
        save_checkpoint(tmp_path, step=2, pmodel=model, optimizer=optimizer, extra_state={"sampler": object()})


def test_a_rank_with_nothing_to_train_saves_and_loads(tmp_path, seed):
    """A pipeline stage of frozen towers holds an optimizer with one empty group: no state to keep."""
    from pivot_mega.training import OptimConfig, build_optimizer

    model = VisionLanguageModel(tiny_config()).init_weights(seed)
    model.requires_grad_(False)  # as on a stage holding only towers the run freezes
    optimizer = build_optimizer(model.named_parameters(), OptimConfig(), "cpu")
    assert [len(group["params"]) for group in optimizer.param_groups] == [0]
    save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer).wait()
    fresh = VisionLanguageModel(tiny_config()).init_weights(seed + 1).requires_grad_(False)
    fresh_optimizer = build_optimizer(fresh.named_parameters(), OptimConfig(), "cpu")
    load_checkpoint(tmp_path / "checkpoints" / "step_000001", pmodel=fresh, optimizer=fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_an_async_save_holds_the_state_of_its_step(tmp_path, seed):
    """The state is copied before ``save_checkpoint`` returns: weights changed right after (as the next
    optimizer step changes them while the write runs) are not in the checkpoint."""
    model, optimizer = _model_and_optimizer(tiny_config(), seed)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    pending = save_checkpoint(tmp_path, step=1, pmodel=model, optimizer=optimizer, async_save=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    path = pending.wait()
    fresh, fresh_optimizer = _model_and_optimizer(tiny_config(), seed + 1)
    load_checkpoint(path, pmodel=fresh, optimizer=fresh_optimizer)
    assert all(torch.equal(param, before[name]) for name, param in fresh.named_parameters())


def _async_group_worker(rank, world_size, config, seed, out_dir):
    pmodel = _build(ParallelConfig(), config, seed)
    optimizer = torch.optim.AdamW(pmodel.parameters(), lr=1e-2)
    group = async_save_group()
    backend = dist.get_backend(group)
    for step in (1, 2):
        save_checkpoint(out_dir, step=step, pmodel=pmodel, optimizer=optimizer, async_save=True,
                        async_group=group).wait()
    dist.barrier(group=group)  # the saves leave the run's group to the run
    pending = save_checkpoint(out_dir, step=3, pmodel=pmodel, optimizer=optimizer, async_save=True,
                              async_group=group)
    pending.close()  # as a run ending by an error does: the write finishes, nothing is committed
    try:
        pending.wait()
        closed = None
    except CheckpointError as e:
        closed = str(e)
    dist.destroy_process_group(group)
    return {"backend": backend, "closed": closed}


@pytest.mark.multiproc
def test_async_saves_share_the_runs_gloo_group_and_close_leaves_the_write_uncommitted(tmp_path, seed):
    results = run_workers(_async_group_worker, 2, tiny_config(), seed, tmp_path)
    assert all(r["backend"] == "gloo" for r in results)
    assert all("closed without being completed" in r["closed"] for r in results)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert resolve_resume(tmp_path, "auto") == root / "step_000002"
    closed = root / "step_000003.tmp"
    assert (closed / ".metadata").is_file() and not (closed / "checkpoint.json").exists()
