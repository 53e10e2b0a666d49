"""Launcher for multi-process tests: N gloo ranks on this machine, results and errors back to pytest.

    def _worker(rank, world_size, x):          # module level, so spawned processes can import it
        ...                                     # the process group is already initialised
        return something_picklable

    results = run_workers(_worker, 2, x)        # [result of rank 0, result of rank 1]

A failing rank's traceback is raised in the test with its rank; a rank that hangs is killed after
``timeout`` seconds and reported.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
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
        # Bytes, not tensors: a tensor put on the queue is shared by file descriptor and is gone once this
        # process exits. Results are tensors, numbers, strings and containers of them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
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
    deadline = time.monotonic() + timeout
    grace_end = deadline
    try:
        while len(results) + len(errors) < world_size:
            if errors and time.monotonic() > grace_end:
                break  # the other ranks are likely stuck in a collective with a failed one
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                if errors:
                    continue
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise WorkerError(f"{fn.__name__}: rank(s) {dead} died (exit codes "
                                      f"{[procs[r].exitcode for r in dead]}) without reporting") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"{fn.__name__}: no answer from ranks "
                                      f"{sorted(set(range(world_size)) - set(results))} within {timeout:.0f} s") from None
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
            else:
                errors.append(f"rank {rank} of {world_size} failed:\n{payload}")
                grace_end = time.monotonic() + 5.0  # the first error may be another rank's consequence
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        silent = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs)
                  if r not in results and not any(e.startswith(f"rank {r} ") for e in errors)]
        raise WorkerError("\n".join(errors + ([f"no report from: {', '.join(silent)}"] if silent else [])))
    return [results[r] for r in range(world_size)]


def require_procs(n: int):
    """Skip marker for tests that need ``n`` processes: they run only where there are n cores."""
    cores = os.cpu_count() or 1
    return pytest.mark.skipif(cores < n, reason=f"needs {n} CPU cores for {n} gloo processes, this machine has {cores}")
