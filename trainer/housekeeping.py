"""Housekeeping of a train_cifar.py run, kept apart so that the trainer reads as the recipe: the
checks that give every bad flag a one-line error, the run's files (checkpoints written atomically,
the JSON-lines log, what --resume reads back), the progress lines, and stopping cleanly on Ctrl-C or
SIGTERM. Nothing here changes what is trained.
"""
import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch
import torchvision


# ---------------------------------------------------------------------------------------------
# Flags: every bad value gets one line naming the flag, not a traceback.

class Fail(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):              # the message names the flag; no usage block above it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_args(args, n_train_images):
    """Raise ValueError naming the first flag whose value cannot work; sets args.n_train (the
    training images left after --subset and --val, of --fake-data or of the n_train_images)."""
    rules = [("hdim depth ksize psize epochs batch_size bench_steps lr eps", lambda v: v > 0, "be positive"),
             ("wd clip mixup cutmix workers val fake_data eval_every ra_n ra_mstd progress_every",
              lambda v: v >= 0, "not be negative"),
             ("reprob label_smoothing ra_p", lambda v: 0 <= v <= 1, "be in [0, 1]"),
             ("ra_m", lambda v: 0 <= v <= 10, "be in [0, 10], timm's magnitude scale"),
             ("scale", lambda v: 0 < v <= 1, "be in (0, 1]"),
             ("subset", lambda v: v is None or v > 0, "be positive")]
    rules += [("seed", lambda v: 0 <= v < 2**32, "be in [0, 2**32)"),      # and sizes beyond reason
              ("hdim", lambda v: v <= 2**16, "be at most 65536"),
              ("depth", lambda v: v <= 4096, "be at most 4096"),
              ("epochs", lambda v: v <= 10**6, "be at most 1000000"),
              ("ra_n", lambda v: v <= 100, "be at most 100"),
              ("workers", lambda v: v <= 256, "be at most 256"),
              ("fake_data", lambda v: v <= 10**6, "be at most 1000000")]
    rules += [(name, math.isfinite, "be a finite number") for name, value in vars(args).items()
              if isinstance(value, float)]
    for names, ok, rule in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {getattr(args, name)}")
    n_available = args.fake_data or n_train_images
    args.n_train = min(args.subset or n_available, n_available - args.val)
    problems = [
        (args.psize > 32, f"--psize {args.psize} is larger than the 32 x 32 CIFAR-10 images"),
        (args.ksize >= 2 * (32 // max(args.psize, 1)), f"--ksize {args.ksize}: at --psize {args.psize} the "
         f"patch grid is {32 // max(args.psize, 1)} wide, and a kernel of twice that sees only padding"),
        (args.val >= n_available, f"--val {args.val} leaves no training images (there are {n_available})"),
        ((args.subset or 0) > n_available - args.val, f"--subset {args.subset} is larger than the "
         f"{n_available - args.val} training images left after --val {args.val}"),
        (not args.eval and not args.benchmark and args.n_train < args.batch_size,
         f"--batch-size {args.batch_size} is larger than the {args.n_train} training images"),
        (args.resume and not args.out, "--resume needs --out, the folder of the run to continue"),
        (sum(map(bool, (args.resume, args.eval, args.benchmark))) > 1,
         "--resume, --eval and --benchmark do not go together"),
        (args.out and Path(args.out).exists() and not Path(args.out).is_dir(),
         f"--out {args.out} is a file, not a folder; choose a folder"),
        (args.out and not args.resume and not args.eval and Path(args.out).is_dir()
         and any(Path(args.out).iterdir()), f"--out {args.out} already exists and is not empty; "
         "add --resume to continue that run, or choose another folder")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")


# ---------------------------------------------------------------------------------------------
# Progress, and stopping between steps on Ctrl-C or SIGTERM

class Progress:
    """What a person sees while an epoch runs: on a terminal one line redrawn every step; in a
    log file a line every --progress-every seconds; once, after that long, an estimate of the
    whole run."""

    def __init__(self, recipe, steps_done, every, device):
        self.steps_per_epoch = recipe.n_train // recipe.batch_size
        self.total = recipe.epochs * self.steps_per_epoch
        self.batch_size, self.every, self.device = recipe.batch_size, every, device
        self.live = sys.stdout.isatty()
        self.start, self.start_steps = time.time(), steps_done
        self.last_line, self.estimated = self.start, False

    def step(self, epoch, step, loss):
        now, done = time.time(), epoch * self.steps_per_epoch + step
        rate = (done - self.start_steps) / max(now - self.start, 1e-9)          # steps per second
        eta = format_seconds((self.total - done) / max(rate, 1e-9))
        line = (f"  epoch {epoch + 1} step {step}/{self.steps_per_epoch}  loss {loss:.3f}  "
                f"{rate * self.batch_size:,.0f} img/s  ETA {eta}")
        if self.live:
            print("\r" + line + " ", end="", flush=True)
        elif now - self.last_line >= self.every:
            print(line, flush=True)
            self.last_line = now
        if not self.estimated and now - self.start >= self.every:
            self.estimated = True
            whole = self.total / max(rate, 1e-9)
            hint = ("; that is long: --epochs 2 --subset 2000 checks the pipeline in minutes, "
                    "and a GPU trains much faster" if whole > 86400 and self.device.type == "cpu" else "")
            print(f"{'' if not self.live else chr(10)}estimate: at {rate * self.batch_size:,.0f} img/s "
                  f"the whole run of {self.total:,} steps takes about {format_seconds(whole)} on "
                  f"{device_name(self.device)} (ETA {eta}){hint}", flush=True)

    def end_epoch(self):
        if self.live:
            print("\r" + " " * 100 + "\r", end="")


def ignore_sigint(_):
    """Data workers leave Ctrl-C to the main process, which stops cleanly between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop stops between steps and saves. A second ^C quits now."""

    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving last.pt "
              f"(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)


class Interrupted(Exception):
    def __init__(self, signum, out, epoch, step):
        super().__init__(f"{signal.Signals(signum).name}: stopped at epoch {epoch + 1}, step {step}; "
                         f"state saved to {out / 'last.pt'}. Continue with: "
                         f"python train_cifar.py --resume --out {out}")
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------
# Files: checkpoints are replaced atomically, so a kill mid-write leaves the previous one intact.

def save_atomic(obj, path, write=torch.save):
    tmp = path.with_name(path.name + ".tmp")
    write(obj, tmp)
    os.replace(tmp, path)


def write_log(path, record, mode="a"):
    with open(path, mode) as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_resume_state(out, recipe_keys):
    """last.pt's contents, after checking that this version can continue that run."""
    for name in ("last.pt", "log.jsonl"):
        if not (out / name).exists():
            raise Fail(f"--resume: {out / name} does not exist; is {out} a run of train_cifar.py?")
    state = read_checkpoint(out / "last.pt", "--resume")
    missing = [k for k in recipe_keys if k not in state.get("recipe", {})]
    if missing:
        raise Fail(f"--resume: {out / 'last.pt'} was written by an older train_cifar.py, whose "
                   f"recipe lacks {', '.join(missing)}; this version cannot continue it")
    epochs = state["recipe"]["epochs"]
    if state["epoch"] < epochs:
        print(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']} "
              f"(the recipe is taken from last.pt)")
    elif any(r.get("final") for r in read_log(out / "log.jsonl")):
        raise Fail(f"--resume: the run in {out} has already finished all its epochs")
    else:       # stopped between the last epoch and the final evaluation: do that now
        print(f"resuming {out}: all {epochs} epochs are done; final evaluation and model.pt")
    return state


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_log(out, recipe, device, n_params, resume_state=None):
    """Create the run's folder and start log.jsonl with the recipe and versions; when resuming, cut
    the log back to where last.pt stands instead. One line of error if --out cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            write_log(out / "log.jsonl", {"config": recipe, "versions": {
                "torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version()}, "device": device_name(device),
                "n_params": n_params, "argv": sys.argv}, mode="w")
        else:
            rewrite_log_for_resume(out / "log.jsonl", resume_state["epoch"], resume_state["step"], device)
    except OSError as e:
        raise Fail(f"--out {out}: cannot write there ({e.strerror}: {e.filename})") from None


def rewrite_log_for_resume(path, epoch, step, device):
    """Drop epoch lines written after last.pt (a kill between the two writes), then say so."""
    keep = [r for r in read_log(path)
            if not r.get("final") and not ("train_loss" in r and r["epoch"] > epoch)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    write_log(path, {"resumed": True, "epoch": epoch + 1, "step": step,
                     "device": device_name(device), "torch": torch.__version__})


def read_checkpoint(path, flag):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise Fail(f"{flag} {path}: cannot read it as a checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise Fail(f"{flag} {path}: not a checkpoint written by train_cifar.py "
                   f"(needs 'state_dict' and 'config')")
    return ckpt


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_seconds(s):
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{s // 3600 % 24:02d}h"
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
