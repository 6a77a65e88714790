"""Fixtures shared by the test files: the reference runs that several tests compare with (made once
for all of tests/ and only read), the fast/ modules, and Triton's interpreter for their kernels on a
CPU.
"""
import os
import signal
import threading
import time

import pytest
import torch

if not torch.cuda.is_available():
    # Run fast/'s Triton kernels on the CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import TINY, run_script, start_or_resume  # noqa: E402


@pytest.fixture(scope="package")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_script(*TINY, "--workers", "0", "--out", out)
    return out, result


@pytest.fixture(scope="package")
def killable_reference(tmp_path_factory):
    """The uninterrupted run, as the killed runs go (last.pt after every step), and how long its start
    (imports, data, model) and its training with the final evaluation took. Not up to the process's
    exit: that took as long again as the training here, and a kill drawn there found the run done."""
    out = tmp_path_factory.mktemp("killable") / "run"
    start = time.time()
    proc = start_or_resume(out)
    watchdog = threading.Timer(300, proc.kill)                     # a hung run ends the reads below
    watchdog.start()
    proc.stdout.readline()                                         # "ConvMixer-8/1 ...": training starts
    started = ended = time.time()
    for line in proc.stdout:
        if line.startswith("final test accuracy"):                # the last line: then only the exit
            ended = time.time()
    stdout, stderr = proc.communicate(timeout=300)
    watchdog.cancel()
    assert proc.returncode == 0 and ended > started, stdout + stderr
    return out, (started - start, ended - started)


@pytest.fixture
def keep_signal_handlers():
    """train() installs SIGINT/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def fast_depthwise():
    pytest.importorskip("triton")
    from fast import depthwise
    return depthwise


@pytest.fixture(scope="module")
def gelu_batchnorm():
    pytest.importorskip("triton")
    from fast import gelu_batchnorm
    return gelu_batchnorm
