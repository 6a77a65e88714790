"""Housekeeping of a train_cifar.py run, kept apart so that the trainer reads as the recipe: the
checks that give every bad flag (and a missing or corrupt data set) a one-line error, the stand-in
data of smoke tests (--fake-data), the progress lines, and stopping cleanly on Ctrl-C or SIGTERM
(the run's files are in files.py). Nothing here changes what a CIFAR-10 run trains; check_args only
chooses how, where a flag is left out (--fast and its step on CUDA).
"""
import argparse
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision
from torchvision.transforms.v2.functional import pil_to_tensor


# ---------------------------------------------------------------------------------------------
# Flags: every bad value gets one line naming the flag, not a traceback.

class Fail(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):              # the message names the flag; no usage block above it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_noting_given(parser, argv):
    """parser.parse_args(argv), and in args.given the flags on the command line: a second parse with
    every default a marker tells them from defaults (--resume checks them against the run's recipe)."""
    args = parser.parse_args(argv)
    marker = object()
    parser.set_defaults(**dict.fromkeys(vars(args), marker))
    args.given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not marker}
    return args


def check_args(args, n_train_images):
    """Raise ValueError naming the first flag whose value cannot work; sets args.n_train (the
    training images left after --subset and --val, of --fake-data or of the n_train_images)."""
    rules = [("hdim depth ksize psize epochs batch_size lr eps", lambda v: v > 0, "be positive"),
             ("wd clip mixup cutmix workers val fake_data eval_every ra_n ra_mstd progress_every save_every",
              lambda v: v is None or v >= 0, "not be negative"),
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
        (not args.eval and args.n_train < args.batch_size,
         f"--batch-size {args.batch_size} is larger than the {args.n_train} training images"),
        (args.resume and not args.out, "--resume needs --out, the folder of the run to continue"),
        (args.resume and args.eval, "--resume and --eval do not go together"),
        (args.out and Path(args.out).exists() and not Path(args.out).is_dir(),
         f"--out {args.out} is a file, not a folder; choose a folder"),
        (args.out and not args.resume and not args.eval and Path(args.out).is_dir()
         and any(f.suffix != ".tmp" for f in Path(args.out).iterdir()),      # a kill's .tmp is no run
         f"--out {args.out} already exists and is not empty; add --resume to continue that run, "
         "or choose another folder")]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    backend = getattr(torch, device.type, None)                # torch.cuda, torch.mps, torch.xpu, ...
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device {args.device}: {device.type.upper()} is not available here")
    if device.type != "cpu" and device.index is not None and device.index >= backend.device_count():
        raise ValueError(f"--device {args.device}: there is no {device.type} device {device.index} here "
                         f"({backend.device_count()} in all, numbered from 0)")
    cuda = device.type == "cuda"
    if getattr(args, "fused_norm", False) and not triton_runs_on(device):
        raise ValueError(f"--fused-norm runs Triton kernels, which need a CUDA device, not {args.device}")
    if getattr(args, "step_mode", "host") == "graph" and not cuda and (
            not args.resume or "step_mode" in getattr(args, "given", ())):
        raise ValueError(f"--step-mode graph needs a CUDA device (it replays a CUDA graph), "
                         f"not {args.device}")


def check_precision(recipe, device):
    """Fail in one line for a precision (--amp-dtype, --no-amp) that this device, or the fast path,
    is not tested to run: the fast path's kernels and device step are tested in bfloat16 and float32,
    not under float16's loss scaling; on Apple's MPS, the plain path in float32 is what runs."""
    dtype = recipe.amp_dtype if recipe.amp else "float32"
    if device.type == "mps" and (dtype != "float32" or recipe.fast or recipe.step_mode != "host"):
        raise Fail("--device mps runs the plain path in float32 (autocast and fast/ are not tested on "
                   "MPS): add --no-fast, and --no-amp or no --amp-dtype")
    if dtype == "float16":
        fast = [flag for flag, on in [("--fast", recipe.fast), (f"--step-mode {recipe.step_mode}",
                recipe.step_mode != "host"), ("--fused-norm", recipe.fused_norm)] if on]
        if fast:
            raise Fail(f"--amp-dtype float16 (loss scaling) is not tested with {' '.join(fast)}: drop "
                       f"{'it' if len(fast) == 1 else 'them'} (--no-fast, --step-mode host), or train in "
                       f"--amp-dtype bfloat16 or --no-amp")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Fail(f"--amp-dtype bfloat16: {device_name(device)} cannot compute in bfloat16; "
                   f"use --amp-dtype float16")


def triton_runs_on(device):
    """Whether fast/'s Triton kernels run on `device`: CUDA, or a CPU in Triton's interpreter
    (TRITON_INTERPRET=1, as the tests run them)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def open_cifar10(root, train):
    """torchvision's CIFAR10 in `root`, downloaded there if missing; one line of error for a file
    where the folder should be, a folder that cannot be written, no network, or a corrupt file."""
    folder = Path(root) / "cifar-10-batches-py"
    if Path(root).exists() and not Path(root).is_dir():
        raise Fail(f"--data {root} is a file; give the folder that holds (or will hold) cifar-10-batches-py")
    try:
        return torchvision.datasets.CIFAR10(root, train=train, download=True)
    except PermissionError as e:
        raise Fail(f"--data {root}: cannot read or write there ({e.strerror}: {e.filename})") from None
    except Exception as e:   # no network, a bad mirror, a corrupt archive...
        files = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list
        bad = [folder / name for name, md5 in files if (folder / name).exists()
               and not torchvision.datasets.utils.check_integrity(str(folder / name), md5)]
        if bad:      # torchvision tried to download it again, and could not
            raise Fail(f"--data {root}: {bad[0]} fails CIFAR-10's MD5 checksum (truncated or "
                       f"corrupt); delete it, or the whole {folder}, to download it again") from None
        raise Fail(f"--data {root}: CIFAR-10 is not there and could not be downloaded ({e}). "
                   f"Put the official python version there, as {folder}/ "
                   f"or {Path(root) / 'cifar-10-python.tar.gz'}") from None


def load_fake(n, train, seed):
    """torchvision's FakeData in CIFAR-10's format (see train_cifar.load_cifar10: 10 classes), n
    training images or n/5 test images, for smoke tests without the data set (--fake-data)."""
    ds = torchvision.datasets.FakeData(n if train else max(n // 5, 1), (3, 32, 32), 10,
                                       random_offset=seed + (0 if train else 10**6))
    images = torch.stack([pil_to_tensor(ds[i][0]) for i in range(len(ds))])
    return images, torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def non_finite_loss(steps_done, steps_per_epoch, out):
    """The error for a loss that became nan or inf at the run's step `steps_done` (from 1)."""
    epoch, step = divmod(steps_done - 1, steps_per_epoch)
    return Fail(f"the loss became nan or inf at epoch {epoch + 1}, step {step + 1}; stopped before "
                f"updating the weights; the last good checkpoint, {out / 'last.pt'}, was kept")


# ---------------------------------------------------------------------------------------------
# Progress, and stopping between steps on Ctrl-C or SIGTERM

PRECISION = {"bfloat16": "bfloat16 autocast", "float16": "float16 autocast with loss scaling",
             "float32": "float32"}


def announce(recipe, n_params, steps_per_epoch, where, out, notes=()):
    """The run's first line: what is trained, on what, in which precision, where it is written, and
    from which code; then, a line each, why a GPU runs the plain path."""
    fast = ""
    if recipe.fast:          # Triton's version is recorded on CUDA only; None: it is not installed
        no_triton = where["versions"].get("triton", "") is None
        fast = " (fast path; no Triton here, so PyTorch's depthwise convs)" if no_triton else " (fast path)"
    print(f"ConvMixer-{recipe.hdim}/{recipe.depth} k{recipe.ksize} p{recipe.psize}: {n_params:,} parameters; "
          f"{recipe.n_train:,} training images, {steps_per_epoch} steps/epoch, {recipe.epochs} "
          f"epoch{'s' * (recipe.epochs != 1)} on {where['device']}{fast}, "
          f"{PRECISION[recipe.amp_dtype if recipe.amp else 'float32']}"
          f"{'' if recipe.step_mode == 'host' else f', step mode {recipe.step_mode}'}"
          f"{', fused GELU -> BatchNorm' if recipe.fused_norm else ''}"
          f"{', torch.compile' if recipe.compile else ''}; "
          f"writing to {out}; code: {describe_code(where['code'])}", flush=True)
    for note in notes:
        print(note, flush=True)


def describe_code(code):
    if code is None:
        return "not a git checkout (set CONVMIXER_COMMIT to record the commit of a copy)"
    changes = {True: " with uncommitted code changes", False: "", None: " (as CONVMIXER_COMMIT names it)"}
    return f"commit {code['commit'][:12]}{changes[code['dirty']]}"


# A small model for 2 epochs on 2,000 images: 8 s of the run's wall time on 2 CPU cores, 17 s from
# the shell (torch 2.14.1; README, Run it).
QUICK_CHECK = "--hdim 32 --depth 2 --ksize 5 --psize 2 --epochs 2 --subset 2000"


class Progress:
    """What a person sees while an epoch runs: on a terminal one line redrawn every step; in a
    log file a line every --progress-every seconds; once, after that long, an estimate of the
    whole run."""

    def __init__(self, recipe, steps_done, every, device):
        self.steps_per_epoch = recipe.n_train // recipe.batch_size
        self.total = recipe.epochs * self.steps_per_epoch
        self.batch_size, self.epochs = recipe.batch_size, recipe.epochs
        self.every, self.device = every, device
        self.live = sys.stdout.isatty()
        self.start, self.start_steps = time.time(), steps_done
        self.last_line, self.estimated = self.start, False

    def step(self, epoch, step, loss):
        """After a step; `loss` may be a device tensor, read (a host sync) only for a line printed."""
        now, done = time.time(), epoch * self.steps_per_epoch + step
        rate = (done - self.start_steps) / max(now - self.start, 1e-9)          # steps per second
        eta = format_seconds((self.total - done) / max(rate, 1e-9))
        # On a terminal the line is redrawn up to 10 times a second; in a file, every `every` s.
        if now - self.last_line >= (0.1 if self.live else self.every):
            line = (f"  epoch {epoch + 1} step {step}/{self.steps_per_epoch}  loss {float(loss):.3f}  "
                    f"{rate * self.batch_size:,.0f} img/s  ETA {eta}")
            print("\r" + line + " " if self.live else line, end="" if self.live else "\n", flush=True)
            self.last_line = now
        if not self.estimated and now - self.start >= self.every:
            self.estimated = True
            whole = self.total / max(rate, 1e-9)
            hint = (f"; that is long: a GPU trains much faster, and {QUICK_CHECK} checks the whole "
                    "pipeline in seconds on a CPU" if whole > 86400 and self.device.type == "cpu" else "")
            print(f"{'' if not self.live else chr(10)}estimate: at {rate * self.batch_size:,.0f} img/s "
                  f"the whole run of {self.total:,} steps takes about {format_seconds(whole)} on "
                  f"{device_name(self.device)} (ETA {eta}){hint}", flush=True)

    def end_epoch(self):
        if self.live:
            print("\r" + " " * 100 + "\r", end="")

    def end_of_epoch(self, record):
        """The line that stays: the epoch's log record, in words."""
        print(f"epoch {record['epoch']:3d}/{self.epochs}  loss {record['train_loss']:.4f}  "
              f"train {record['train_acc']:5.2f}%  "
              + "".join(f"{k[:-4]} {record[k]:5.2f}%  " for k in ("test_acc", "val_acc") if k in record)
              + f"lr {record['lr']:.5f}  {record['epoch_seconds']:.1f} s  "
              f"{record['images_per_second']:,.0f} img/s", flush=True)


# Data workers forked on Linux take a SIGTERM for the run as leave_stops_to_the_main_process says;
# elsewhere (macOS, Windows: no sigwaitinfo, workers spawned) PyTorch's own handling stays.
FORKED_WORKERS = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()


def data_workers(workers):
    """DataLoader's options for `workers` processes. On Linux they are forked, whatever Python's
    default (forkserver from 3.14): a forked worker has the data set already, instead of receiving
    it pickled (150 MB) and importing torch again at every epoch's start, and it starts with one
    thread, which leave_stops_to_the_main_process needs."""
    return {"num_workers": workers, "worker_init_fn": leave_stops_to_the_main_process if workers else None,
            "multiprocessing_context": "fork" if workers and FORKED_WORKERS else None}


def start_loader(loader):
    """iter(loader), whose worker processes are forked with SIGTERM blocked: they hold it from their
    first instant until leave_stops_to_the_main_process takes it, and the main process gets one
    that came meanwhile as soon as they are started."""
    if not FORKED_WORKERS:
        return iter(loader)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def leave_stops_to_the_main_process(_worker_id):
    """In each data worker: Ctrl-C, and a SIGTERM sent to every process of the run (as `timeout`,
    `kill -- -PGID`, systemd or a batch scheduler's time limit send it), are the main process's to
    handle: it saves last.pt between two steps, then shuts its workers down. Otherwise a worker dies
    of the SIGTERM and the main process fails in the middle of a step ("DataLoader worker ... is
    killed by signal"), losing the steps since the last save. A SIGTERM from the main process (how
    DataLoader ends a worker that does not stop) still ends the worker, as PyTorch's own handler
    does. Needs a forked worker (one thread; see FORKED_WORKERS) and sigwaitinfo, to know who sent it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not (FORKED_WORKERS and hasattr(signal, "sigwaitinfo")):
        return
    main_process = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})    # taken by the thread below only

    def take_sigterms():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_process:
                os._exit(0)

    threading.Thread(target=take_sigterms, daemon=True).start()


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


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_seconds(s):
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{s // 3600 % 24:02d}h"
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
