"""What train_cifar.py needs besides the recipe: the checks that give each bad input one line, the
choices that depend on the machine, and the run's files (written atomically, read with one-line
errors). Nothing here changes what a run computes.
"""
import argparse
import importlib.util
import io
import math
import os
import platform
import subprocess
from pathlib import Path

import torch
import torchvision


class Fail(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


def number(kind, low, high=math.inf, above=False):
    """An argparse type: a finite `kind` in [low, high], or in (low, high] with above."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}")
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            bounds = f"{'above' if above else 'at least'} {low}" + f" and at most {high}" * (high < math.inf)
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def check_args(args, given, resume_flags):
    """ValueError naming the flag, for values that cannot work together; sets args.n_train."""
    n = args.fake_data or 50_000
    args.n_train = min(args.subset or n, n - args.val)
    grid = 32 // args.psize
    changed = ", ".join("--" + k.replace("_", "-") for k in sorted(given - resume_flags))
    for bad, message in [
            (args.ksize >= 2 * grid, f"--ksize {args.ksize}: at --psize {args.psize} the patch grid is {grid} "
                                     f"wide, and a kernel of twice that sees only padding"),
            (args.val >= n, f"--val {args.val} leaves no training images (there are {n})"),
            ((args.subset or 0) > n - args.val,
             f"--subset {args.subset} is more than the {n - args.val} training images left after --val"),
            (not args.eval and args.n_train < args.batch_size,
             f"--batch-size {args.batch_size} is more than the {args.n_train} training images"),
            (args.resume and not args.out, "--resume needs --out, the folder of the run to continue"),
            (args.resume and args.eval, "--resume and --eval do not go together"),
            (args.resume and changed, f"--resume continues the run with its own recipe; drop {changed}"),
            (args.out and Path(args.out).is_file(), f"--out {args.out} is a file; give a folder"),
            (args.out and not args.resume and not args.eval and Path(args.out).is_dir()
             and any(f.suffix != ".tmp" for f in Path(args.out).iterdir()),
             f"--out {args.out} holds a run already; add --resume to continue it, or choose another folder")]:
        if bad:
            raise ValueError(message)


def choose_for_the_hardware(args):
    """The defaults that depend on the machine, all chosen here (a flag given wins): the device, the
    precision and the fast path. Returns notes for the run's first lines; ValueError for a device or
    a precision that cannot run here."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    backend = getattr(torch, device.type, None)                       # torch.cuda, torch.mps, ...
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device {args.device}: {device.type.upper()} is not available here")
    if device.type != "cpu" and (device.index or 0) >= backend.device_count():
        raise ValueError(f"--device {args.device}: there is no {device.type} device {device.index} here "
                         f"({backend.device_count()} in all, numbered from 0)")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if args.amp_dtype == "auto":          # older GPUs emulate bfloat16, slowly; float16 they compute
        args.amp_dtype = "float32" if capability is None else "bfloat16" if capability >= (8, 0) else "float16"
    notes = []
    if args.fast is None:                 # measured on H100 and H200 GPUs only (results/README.md)
        args.fast = capability == (9, 0) and importlib.util.find_spec("triton") is not None
        if capability and not args.fast:
            notes.append("plain path: --fast is measured only on compute capability 9.0 (H100, H200) with "
                         "Triton; --fast asks for it here")
    if args.amp_dtype == "float16" and args.fast:
        raise ValueError("--amp-dtype float16 (loss scaling) is not tested with --fast: add --no-fast, or "
                         "train in --amp-dtype bfloat16 or float32")
    if device.type == "mps" and (args.amp_dtype != "float32" or args.fast):
        raise ValueError("--device mps runs the plain path in float32: add --amp-dtype float32 --no-fast")
    if args.amp_dtype == "bfloat16" and capability and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError("--amp-dtype bfloat16: this GPU cannot compute in bfloat16; use --amp-dtype float16")
    return notes


def open_cifar10(root, train):
    """torchvision's CIFAR10 in root, downloaded there if missing, with one line for what went wrong."""
    folder = Path(root) / "cifar-10-batches-py"
    if Path(root).is_file():
        raise Fail(f"--data {root} is a file; give the folder that holds (or will hold) cifar-10-batches-py")
    try:
        return torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as e:        # no network, no permission, a damaged file that cannot be fetched again
        files = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list
        bad = [folder / name for name, md5 in files if (folder / name).exists()
               and not torchvision.datasets.utils.check_integrity(str(folder / name), md5)]
        raise Fail(f"--data {root}: {bad[0]} fails its MD5 checksum; delete it to download it again" if bad
                   else f"--data {root}: CIFAR-10 is not there and could not be downloaded "
                        f"({type(e).__name__}: {e}); put the python version in {folder}/") from None


def save_atomic(obj, path):
    """Write obj (torch.save's bytes, or a str) to path.tmp, fsync it, then rename it over path: a kill
    at any instant leaves the old file or the new one, and a failed write leaves the old one."""
    buffer = io.BytesIO()
    if isinstance(obj, str):
        buffer.write(obj.encode())
    else:
        torch.save(obj, buffer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"the {path.name} there before is intact" if path.exists() else "nothing was written"
        raise Fail(f"could not write {path} ({e.strerror}); {kept}") from None


def read_checkpoint(path, flag):
    """A checkpoint (last.pt or model.pt), with one line for a missing or damaged one."""
    if not Path(path).is_file():
        raise Fail(f"{flag}: there is no {path}" + "; start the run without --resume" * (flag == "--resume"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Fail(f"{flag} {path}: cannot read it as a checkpoint; it may be truncated or foreign "
                   f"({type(e).__name__})") from None


def where_it_runs(device):
    """What the log records at each start and resume: the device, the code's commit (a copy that is no
    checkout names it in CONVMIXER_COMMIT) and whether its Python files had changes, the versions."""
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "-uno", "--", "*.py"], capture_output=True).stdout
    except OSError:                       # no git here
        commit, dirty = "", b""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "commit": commit or os.environ.get("CONVMIXER_COMMIT"), "dirty": bool(dirty),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def hms(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
