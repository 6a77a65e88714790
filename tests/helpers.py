"""What the test files share: where CIFAR-10 is, the tiny runs of train_cifar.py and how to read
their files, and a machine with a GPU as the trainer's choices see it.
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
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cifar10_root():
    """Where the real CIFAR-10 is (CI unpacks it and sets CIFAR10_ROOT), or None."""
    for root in (os.environ.get("CIFAR10_ROOT"), str(ROOT / "data")):
        if root and (Path(root) / "cifar-10-batches-py" / "test_batch").exists():
            return root
    return None


REAL_DATA = cifar10_root()
DATA = ["--data", REAL_DATA, "--subset", "3000"] if REAL_DATA else ["--fake-data", "1000"]
TINY = ["--hdim", "32", "--depth", "2", "--ksize", "5", "--psize", "2", "--epochs", "3", "--batch-size", "128",
        "--device", "cpu", "--seed", "0", "--eval-every", "2", "--workers", "0", *DATA]
FAKE = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--device", "cpu", "--workers", "0"]
# A run of a few seconds for the kill tests: 3 epochs of 10 steps.
SMALL = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--epochs", "3", "--batch-size", "40",
         "--fake-data", "400", "--eval-every", "2", "--device", "cpu", "--workers", "0", "--seed", "3"]


def run_main(*argv):
    """train_cifar.main(argv) in this process; its SIGTERM handler is put back by main itself."""
    import train_cifar
    return train_cifar.main([str(a) for a in argv])


def run_script(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def without_timings(records):
    timing = {"epoch_seconds", "images_per_second", "train_seconds"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records if "train_loss" in r or r.get("final")]


def assert_same_run(out, reference):
    """The same log (less timings), final weights, and last.pt's weights and optimizer, bit for bit."""
    assert without_timings(read_log(out)) == without_timings(read_log(reference))
    a, b = (torch.load(Path(d) / "model.pt", weights_only=True)["state_dict"] for d in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    a, b = (torch.load(Path(d) / "last.pt", weights_only=True) for d in (out, reference))
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    for index, state in b["optimizer"]["state"].items():
        assert all(torch.equal(a["optimizer"]["state"][index][k], v) for k, v in state.items())
    assert not list(Path(out).glob("*.tmp"))


def error_lines_of_main(argv, capsys):
    """The stderr lines with which train_cifar.main(argv) exits, run in this process. Anything but
    a SystemExit (a traceback, for a user) fails the test."""
    import train_cifar
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_cifar.main([str(a) for a in argv])
    assert e.value.code not in (0, None), argv
    message = e.value.code if isinstance(e.value.code, str) else ""   # sys.exit(text) prints text
    return (capsys.readouterr().err + message).strip().splitlines()


def sample_images(n, seed=0):
    """Real CIFAR-10 training images when available, else smooth random images."""
    if REAL_DATA:
        import torchvision
        data = torchvision.datasets.CIFAR10(REAL_DATA, train=True).data[:n]
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g) * 255
    return nn.functional.interpolate(small, size=32, mode="bilinear").round().to(torch.uint8)


def storage_locations(path):
    """The devices that a checkpoint's tensors were saved from (torch.load puts each back there)."""
    found = set()
    torch.load(path, weights_only=True, map_location=lambda storage, location: found.add(location) or storage)
    return found


def as_on_a_gpu(monkeypatch, capability=(9, 0), bf16=True):
    """Make torch.cuda answer as on a machine with one NVIDIA GPU of this compute capability (9.0: an
    H100), for the choices the trainer makes before it touches the GPU; MPS is absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def kill_after(seconds, *argv, killer=None):
    """train_cifar.py with argv in a process SIGKILLed after `seconds` (or that kills itself inside a
    write, as KILL_INSIDE says); returns its exit code."""
    prefix = [sys.executable, "-c", KILL_INSIDE, *map(str, killer)] if killer else \
        [sys.executable, str(ROOT / "train_cifar.py")]
    proc = subprocess.Popen([*prefix, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


# train_cifar.main in a process that SIGKILLs itself in its n-th write of a file named NAME: after
# half of NAME.tmp ("torn"), or with NAME.tmp whole but not yet renamed ("unrenamed").
KILL_INSIDE = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import housekeeping, train_cifar
name, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls, real = [0], housekeeping.save_atomic
def save_atomic(obj, path):
    if path.name == name:
        calls[0] += 1
        if calls[0] == n:
            real(obj, path.with_name(path.name + ".whole"))
            data = (path.with_name(path.name + ".whole")).read_bytes()
            path.with_name(path.name + ".whole").unlink()
            path.with_name(path.name + ".tmp").write_bytes(data[:len(data) // 2] if how == "torn" else data)
            os.kill(os.getpid(), signal.SIGKILL)
    real(obj, path)
train_cifar.save_atomic = save_atomic
train_cifar.main(sys.argv[4:])
"""
