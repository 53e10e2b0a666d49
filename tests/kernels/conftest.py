"""A Triton-interpreter process for the kernel tests.

``TRITON_INTERPRET=1`` must be set before triton builds the kernels (at import), and it changes how
every ``@triton.jit`` function in the process runs. So it is set only in a separate process, started
once per session, never in the test process itself.
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from tests.kernels.reference import start_triton_interpreter


@pytest.fixture(scope="session")
def triton_interpreter():
    """An executor whose single worker runs Triton kernels in the CPU interpreter."""
    pytest.importorskip("triton", reason="the triton path is tested in Triton's CPU interpreter")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=start_triton_interpreter) as pool:
        yield pool
