"""What the test files share: where CIFAR-10 is, the tiny runs of train_cifar.py and how to read
their logs, and the killable run of the crash-safety tests.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent              # the repository: train_cifar.py is there
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def cifar10_root():
    """Where the real CIFAR-10 is (CI unpacks it and sets CIFAR10_ROOT), or None."""
    for root in (os.environ.get("CIFAR10_ROOT"), str(ROOT / "data")):
        if root and (Path(root) / "cifar-10-batches-py" / "test_batch").exists():
            return root
    return None


REAL_DATA = cifar10_root()


DATA = ["--data", REAL_DATA] if REAL_DATA else ["--fake-data", "1000"]


TINY = ["--hdim", "32", "--depth", "2", "--ksize", "5", "--psize", "2", "--epochs", "3",
        "--batch-size", "128", "--device", "cpu", "--seed", "0", "--eval-every", "2", *DATA]


TINY += ["--subset", "3000"] if REAL_DATA else []


def run_script(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def storage_locations(path):
    """The devices that a checkpoint's tensors were saved from: torch.load puts each back there, so
    a file with "cuda:0" in it loads on a machine without a GPU only given a map_location."""
    found = set()
    torch.load(path, weights_only=True, map_location=lambda storage, location: found.add(location) or storage)
    return found


def without_timings(records):
    timing = {"epoch_seconds", "images_per_second", "wall_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records
            if "train_loss" in r or r.get("final")]


KILLABLE = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--epochs", "3",
            "--batch-size", "40", "--fake-data", "400", "--eval-every", "2", "--device", "cpu",
            "--workers", "0", "--seed", "3"]


def assert_same_run(out, reference):
    """The same log (less timings), final weights, last.pt and optimizer state, bit for bit."""
    assert without_timings(read_log(out)) == without_timings(read_log(reference))
    for name in ("model.pt", "last.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, reference))
        assert a.keys() == b.keys(), name
        for key, value in b["state_dict"].items():
            assert torch.equal(a["state_dict"][key], value), (name, key)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (out, reference))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert {k: v for k, v in a["sums"].items() if k != "seconds"} == \
        {k: v for k, v in b["sums"].items() if k != "seconds"}
    for index, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(a["optimizer"]["state"][index][key], value), (index, key)
    assert not list(Path(out).glob("*.tmp"))


# Runs train_cifar.main in a process that SIGKILLs itself inside its n-th write of one kind:
# "checkpoint" (half of NAME.tmp written), "rename" (NAME.tmp whole, not yet renamed over NAME),
# "model" (half of model.pt.tmp) or "log" (half a line).
KILL_INSIDE = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train_cifar, trainer.files as files
kind, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == n
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_write_atomic, real_write_log = files.write_atomic, files.write_log
def write_atomic(data, path):
    tmp = path.with_name(path.name + ".tmp")
    if kind == "checkpoint" and due() or kind == "model" and path.name == "model.pt":
        tmp.write_bytes(data[:len(data) // 2])
        die()
    if kind == "rename" and due():
        tmp.write_bytes(data)
        die()
    real_write_atomic(data, path)
def write_log(path, record):
    if kind == "log" and due():
        line = (files.json.dumps(record) + "\\n").encode()
        with open(path, "ab") as f:
            f.write(line[:len(line) // 2])
        die()
    real_write_log(path, record)
files.write_atomic = write_atomic
files.write_log = train_cifar.write_log = write_log
sys.argv = ["train_cifar.py", *sys.argv[3:]]
train_cifar.main(sys.argv[1:])
"""


def start_or_resume(out, killer=None, new_run=KILLABLE):
    """The command that continues the run in `out` at any point: --resume once its log exists."""
    flags = ["--resume", "--out", out, "--workers", "0", "--device", "cpu"] if (out / "log.jsonl").exists() \
        else [*new_run, "--out", out]
    flags += ["--save-every", "0"]                                       # last.pt after every step
    prefix = [sys.executable, "-c", KILL_INSIDE.format(here=str(ROOT)), *map(str, killer)] if killer else \
        [sys.executable, str(ROOT / "train_cifar.py")]
    return subprocess.Popen([*prefix, *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(out):
    proc = start_or_resume(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    return stdout, stderr


def finished(out):
    return (out / "log.jsonl").exists() and bool(read_log(out)[-1].get("final"))


def error_lines_of_main(argv, capsys):
    """The stderr lines with which train_cifar.main(argv) exits, run in this process. Anything but
    a SystemExit (a traceback, for a user) fails the test; signal handlers are put back."""
    import train_cifar
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            train_cifar.main([str(a) for a in argv])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert e.value.code not in (0, None), argv
    message = e.value.code if isinstance(e.value.code, str) else ""   # sys.exit(text) prints text
    return (capsys.readouterr().err + message).strip().splitlines()


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sample_images(n, seed=0):
    """Real CIFAR-10 training images when available, else smooth random images."""
    if REAL_DATA:
        import torchvision
        data = torchvision.datasets.CIFAR10(REAL_DATA, train=True).data[:n]
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g) * 255
    return nn.functional.interpolate(small, size=32, mode="bilinear").round().to(torch.uint8)


def as_on_a_gpu(monkeypatch, capability=(9, 0), bf16_emulated=True):
    """Make torch.cuda answer as on a machine with one NVIDIA GPU of this compute capability (9.0: an
    H100), for the choices the trainer makes before it touches the GPU; MPS is absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or bf16_emulated)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

