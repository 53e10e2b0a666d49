"""Launcher for multi-process tests: N gloo ranks on this machine, results and errors back to pytest.

    def _worker(rank, world_size, x):          # module level, so spawned processes can import it
        ...                                     # the process group is already initialised
        return something_picklable

    results = run_workers(_worker, 2, x)        # [result of rank 0, result of rank 1]

A failing rank's traceback is raised in the test with its rank; a rank that hangs is killed after
``timeout`` seconds and reported.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank of a multi-process test raised or hung."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, threads):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, threads), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception as e:  # queue.Empty
                raise WorkerError(f"{fn.__name__}: no answer from ranks "
                                  f"{sorted(set(range(world_size)) - set(results))} within {timeout:.0f} s") from e
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} of {world_size} failed:\n{payload}")
                break  # the other ranks are likely stuck in a collective with the failed one
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise WorkerError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def require_procs(n: int):
    """Skip marker for tests that need ``n`` processes: they run only where there are n cores."""
    cores = os.cpu_count() or 1
    return pytest.mark.skipif(cores < n, reason=f"needs {n} CPU cores for {n} gloo processes, this machine has {cores}")
