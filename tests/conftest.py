"""Fixtures shared by the test files: the reference runs that several tests compare with (made once
for all of tests/ and only read), the fast/ kernels, and Triton's interpreter for them on a CPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Run fast/'s Triton kernels on the CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import SMALL, TINY, run_main  # noqa: E402


@pytest.fixture(scope="package")
def reference_run(tmp_path_factory):
    """The TINY run: its folder and what main returned (the final record)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, run_main(*TINY, "--out", out)


@pytest.fixture(scope="package")
def small_reference(tmp_path_factory):
    """SMALL run uninterrupted: what the killed and resumed runs must end as."""
    out = tmp_path_factory.mktemp("small") / "run"
    run_main(*SMALL, "--out", out)
    return out


@pytest.fixture(scope="module")
def fast_depthwise():
    pytest.importorskip("triton")
    from fast import depthwise
    return depthwise
