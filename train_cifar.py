"""Train ConvMixer on CIFAR-10 with the paper's recipe; resumable, and honest about its result.

    python train_cifar.py --hdim 256 --depth 8 --ksize 9        # the paper's ConvMixer-256/8 (200 epochs)
    python train_cifar.py --resume --out runs/<run>             # continue an interrupted run
    python train_cifar.py --eval runs/<run>/model.pt            # test accuracy of a saved model

The recipe (defaults) is the one the ConvMixer authors used for CIFAR-10 with timm: AdamW
(lr 0.01, weight decay 0.01 on weights but not on biases/BatchNorm, eps 1e-3), batch 64, a
one-cycle learning rate stepped every iteration, gradient clipping at norm 1, mixed precision on
GPU; RandomResizedCrop(scale 0.75-1), flip, RandAugment as timm's "rand-m9-mstd0.5-inc1" (2 ops,
each applied with probability 0.5, magnitude 9 of 10; see train_transform), MixUp or CutMix
(alpha 0.5, one of the two per batch), RandomErasing (p 0.25) and label smoothing 0.1.
The paper reports 96.03% for ConvMixer-256/8 (k=9, p=1) after 200 epochs (Table 4).

Evidence so far (README, Results): a 2-epoch ConvMixer-32/2 on 2,000 CIFAR-10 images reaches
21.23% on a 2-thread CPU in 11.6 s, a smoke test; no full-length GPU run has been recorded yet.

Randomness is tied to (seed, epoch, image) rather than to a stream, so a run is the same with any
--workers, and an interrupted run (Ctrl-C, SIGTERM) resumes mid-epoch exactly where it stopped.
Outputs in --out: log.jsonl (config, one line per epoch, final result), model.pt (weights in the
published ConvMixer layout + what is needed to use them), last.pt (full state for --resume).
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
from torch import nn
from torchvision.transforms import v2

from convmixer import ConvMixer

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_MEAN_PIXEL = [round(255 * m) for m in CIFAR10_MEAN]     # (125, 123, 114): fill colour
N_CLASSES = 10
N_TRAIN_IMAGES = 50_000


class Fail(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--hdim", type=int, default=256, help="width (channels) h")
    model.add_argument("--depth", type=int, default=8, help="number of ConvMixer blocks d")
    model.add_argument("--ksize", type=int, default=9, help="depthwise kernel size k")
    model.add_argument("--psize", type=int, default=1, help="patch size p")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=200)
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=0.01, help="peak of the one-cycle schedule")
    opt.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay (weights only)")
    opt.add_argument("--eps", type=float, default=1e-3, help="AdamW epsilon")
    opt.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    opt.add_argument("--label-smoothing", type=float, default=0.1)
    opt.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                     help="bfloat16 autocast on CUDA (the CPU always trains in float32)")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--scale", type=float, default=0.75, help="RandomResizedCrop min scale")
    aug.add_argument("--ra-n", type=int, default=2, help="RandAugment ops drawn per image")
    aug.add_argument("--ra-m", type=int, default=9, help="RandAugment magnitude, on timm's 0-10 scale")
    aug.add_argument("--ra-p", type=float, default=0.5,
                     help="probability that each drawn RandAugment op is applied (as in timm)")
    aug.add_argument("--mixup", type=float, default=0.5, help="MixUp alpha (0: off)")
    aug.add_argument("--cutmix", type=float, default=0.5, help="CutMix alpha (0: off)")
    aug.add_argument("--reprob", type=float, default=0.25, help="RandomErasing probability")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="all randomness derives from it")
    run.add_argument("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    run.add_argument("--fake-data", type=int, metavar="N", default=0,
                     help="use N synthetic images (torchvision FakeData) instead of CIFAR-10, "
                          "to smoke-test the pipeline; accuracy is meaningless")
    run.add_argument("--out", help="output folder; when not given, a new folder under runs/")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu, cuda, cuda:1, ... (cuda when present)")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="data-loading processes (0: load in the main process)")
    run.add_argument("--subset", type=int, metavar="N", help="train on the first N training images")
    run.add_argument("--val", type=int, metavar="N", default=0,
                     help="hold out the last N training images and report accuracy on them")
    run.add_argument("--eval-every", type=int, metavar="N", default=10,
                     help="evaluate on the test set (and --val) every N epochs and after the last "
                          "(0: only after the last); evaluation does not change training")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last.pt (its recipe is reused)")
    run.add_argument("--eval", metavar="CKPT", help="evaluate a saved model on the test set and exit")
    speed = p.add_argument_group("speed (optional; see gpu_augment.py and fast_depthwise.py)")
    speed.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                       help="keep the data on the device and augment whole batches there; on CUDA "
                            "also use the Triton depthwise convolution. Off by default until it "
                            "has been measured on a GPU (see README)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--benchmark", action="store_true",
                       help="time training steps of the plain and the fast path on synthetic data "
                            "for this config, print both, write benchmark.json to --out, and exit")
    speed.add_argument("--bench-steps", type=int, default=30, help="timed steps per path")
    args = p.parse_args(argv)

    for name in ("hdim", "depth", "ksize", "psize", "epochs", "batch_size", "bench_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "eps"):
        if not getattr(args, name) > 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("wd", "clip", "mixup", "cutmix", "workers", "val", "fake_data", "eval_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("reprob", "label_smoothing", "ra_p"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.ra_n < 0 or not 0 <= args.ra_m <= 10:
        p.error(f"--ra-n must be >= 0 and --ra-m in [0, 10], got {args.ra_n}, {args.ra_m}")
    if args.subset is not None and args.subset <= 0:
        p.error(f"--subset must be positive, got {args.subset}")
    n_available = args.fake_data or N_TRAIN_IMAGES
    if args.val >= n_available:
        p.error(f"--val {args.val} leaves no training images (the training set has {n_available})")
    n_train = min(args.subset or n_available, n_available - args.val)
    if args.subset is not None and args.subset > n_available - args.val:
        p.error(f"--subset {args.subset} is larger than the {n_available - args.val} training "
                f"images left after --val {args.val}")
    if not args.eval and not args.benchmark and n_train < args.batch_size:
        p.error(f"--batch-size {args.batch_size} is larger than the {n_train} training images")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.resume and not args.out:
        p.error("--resume needs --out, the folder of the run to continue")
    if sum(map(bool, (args.resume, args.eval, args.benchmark))) > 1:
        p.error("--resume, --eval and --benchmark do not go together")
    if args.out and not args.resume and not args.eval and Path(args.out).exists() \
            and any(Path(args.out).iterdir()):
        p.error(f"--out {args.out} already exists and is not empty; "
                f"add --resume to continue that run, or choose another folder")
    args.n_train = n_train
    return args


# ---------------------------------------------------------------------------------------------
# Data: the whole of CIFAR-10 is 180 MB of uint8, so it is held in memory as tensors.

def load_cifar10(root, train):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)), downloading to `root` if needed."""
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as e:   # no network, a bad mirror, a corrupt archive...
        raise Fail(f"--data {root}: CIFAR-10 is not there and could not be downloaded ({e}). "
                   f"Put the official python version there, as {Path(root) / 'cifar-10-batches-py'}/ "
                   f"or {Path(root) / 'cifar-10-python.tar.gz'}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(ds.targets)


def load_fake(n, train, seed):
    """torchvision FakeData in the same format, for smoke tests without CIFAR-10."""
    ds = torchvision.datasets.FakeData(n if train else max(n // 5, 1), (3, 32, 32), N_CLASSES,
                                       random_offset=seed + (0 if train else 10**6))
    images = torch.stack([v2.functional.pil_to_tensor(ds[i][0]) for i in range(len(ds))])
    return images, torch.tensor([int(ds[i][1]) for i in range(len(ds))])


# RandAugment's magnitude scale: timm's, 0-10 (the paper's "m9"); torchvision's default has 31 bins.
RANDAUGMENT_BINS = 11


def randaugment_op(args):
    """One RandAugment op, drawn at random, as timm's "rand-m9-mstd0.5-inc1" (the paper's setting)
    does it: strengths on timm's 0-10 scale (at 9: rotate 27 degrees, shear 0.27, translate 41% of
    the side, brightness/colour/contrast/sharpness factor 1 +- 0.81, solarize from 26 up), mean-colour
    fill and bilinear resampling where the image moves. Left different from timm: torchvision's op
    list (Identity where timm has Invert and SolarizeAdd), its Posterize scale (4 bits kept at 9,
    timm 1) and a fixed magnitude (timm adds N(0, 0.5) noise to it); README, "The training recipe"."""
    return v2.RandAugment(num_ops=1, magnitude=args.ra_m, num_magnitude_bins=RANDAUGMENT_BINS,
                          interpolation=v2.InterpolationMode.BILINEAR, fill=CIFAR10_MEAN_PIXEL)


def randaugment(args):
    """--ra-n ops drawn per image, each applied with probability --ra-p (timm's default 0.5)."""
    return v2.Compose([v2.RandomApply([randaugment_op(args)], p=args.ra_p) for _ in range(args.ra_n)])


def train_transform(args):
    """Per-image augmentation of a uint8 (3, 32, 32) tensor into a normalized float tensor."""
    return v2.Compose([
        v2.RandomResizedCrop(32, scale=(args.scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        randaugment(args),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        # value="random" fills with N(0, 1) noise in normalized space (timm's "pixel" mode).
        v2.RandomErasing(p=args.reprob, value="random"),
    ])


def batch_mixing(args):
    """Per batch, MixUp or CutMix (chosen at random); labels become class probabilities."""
    mixers = [m(alpha=alpha, num_classes=N_CLASSES)
              for alpha, m in [(args.mixup, v2.MixUp), (args.cutmix, v2.CutMix)] if alpha > 0]
    if not mixers:
        return lambda images, labels: (images, nn.functional.one_hot(labels, N_CLASSES).float())
    return v2.RandomChoice(mixers)


class AugmentedImages(torch.utils.data.Dataset):
    """Items are (index, seed) pairs: each image's augmentation depends only on its own seed,
    so results do not depend on --workers and an epoch can be resumed from any step."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        torch.default_generator.manual_seed(seed)   # the CPU generator that v2 transforms draw from
        return self.transform(self.images[index]), self.labels[index]


class EpochPlan:
    """Everything random about one epoch, drawn from (seed, epoch) alone."""

    def __init__(self, n_images, batch_size, seed, epoch):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.batch_size = batch_size
        self.steps = n_images // batch_size          # drop the last partial batch (BatchNorm)
        self.order = torch.randperm(n_images, generator=g).tolist()
        self.image_seeds = torch.randint(2**62, (n_images,), generator=g).tolist()
        self.mix_seeds = torch.randint(2**62, (self.steps,), generator=g).tolist()
        # --fast: the chunk of batches that starts at step s is augmented with augment_seeds[s].
        self.augment_seeds = torch.randint(2**62, (self.steps,), generator=g).tolist()

    def batches(self, first_step=0):
        """The batch sampler for steps first_step..steps-1: lists of (index, seed)."""
        b = self.batch_size
        return [[(self.order[j], self.image_seeds[j]) for j in range(s * b, (s + 1) * b)]
                for s in range(first_step, self.steps)]


AUGMENT_CHUNK_IMAGES = 8192     # --fast augments this many images at a time (about 100 MB of floats)


def device_batches(plan, first_step, images, labels, augment):
    """--fast: batches cut from the data set held on the device and augmented there, each image
    with its own random parameters (gpu_augment.BatchAugment). (B, 3, 32, 32) float, (B,).

    The augmentation runs on chunks of several batches: a call issues the same operations and
    host syncs for 8192 images as for 512 (1,397 operations; see README). A chunk's randomness
    comes from the seed of its first step, so a resumed epoch rebuilds its chunk exactly."""
    generator = torch.Generator(images.device)
    order = torch.tensor(plan.order, device=images.device)
    b = plan.batch_size
    chunk = max(1, AUGMENT_CHUNK_IMAGES // b)                     # steps per chunk
    for start in range(first_step - first_step % chunk, plan.steps, chunk):
        end = min(start + chunk, plan.steps)
        index = order[start * b:end * b]
        generator.manual_seed(plan.augment_seeds[start])
        x, y = augment(images[index], generator), labels[index]   # (chunk * B, 3, 32, 32), (chunk * B,)
        for step in range(max(start, first_step), end):
            yield x[(step - start) * b:(step - start + 1) * b], y[(step - start) * b:(step - start + 1) * b]


def _worker_init(_):
    """Data workers leave Ctrl-C to the main process, which stops cleanly between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Optimization

def one_cycle_lr(progress, peak):
    """Linear 0 -> peak over the first 2/5 of training, -> peak/20 at 4/5, -> 0 at the end."""
    points = [(0.0, 0.0), (0.4, peak), (0.8, peak / 20), (1.0, 0.0)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if progress <= x1:
            return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)
    return 0.0


def make_optimizer(model, args):
    # As timm does by default: no weight decay on biases and BatchNorm parameters (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # On CUDA the fused implementation: the same update, in far fewer kernel launches.
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, eps=args.eps, fused=decay[0].is_cuda or None)


@torch.no_grad()
def evaluate(model, images, labels, device, amp, flip_tta=False, batch_size=1000):
    """Accuracy (%) of `model` on uint8 images; with flip_tta, logits of x and its mirror added."""
    model.eval()
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        x = (x.float() / 255 - mean) / std
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(x).float()
            if flip_tta:
                logits += model(x.flip(3)).float()
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    model.train()
    return 100.0 * correct / len(images)


# ---------------------------------------------------------------------------------------------
# Files: checkpoints are replaced atomically, so a kill mid-write leaves the previous one intact.

RECIPE_KEYS = ["hdim", "depth", "ksize", "psize", "epochs", "batch_size", "lr", "wd", "eps", "clip",
               "label_smoothing", "amp", "scale", "ra_n", "ra_m", "ra_p", "mixup", "cutmix", "reprob",
               "seed", "fake_data", "subset", "val", "n_train", "fast", "compile"]


def save_atomic(obj, path, write=torch.save):
    tmp = path.with_name(path.name + ".tmp")
    write(obj, tmp)
    os.replace(tmp, path)


def model_config(cfg):
    return {"hdim": cfg["hdim"], "depth": cfg["depth"], "ksize": cfg["ksize"], "psize": cfg["psize"],
            "n_classes": N_CLASSES, "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def build_model(config):
    return ConvMixer(config["hdim"], config["depth"], kernel_size=config["ksize"],
                     patch_size=config["psize"], n_classes=config["n_classes"])


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


def load_weights(model, state_dict, path, flag):
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise Fail(f"{flag} {path}: its weights do not fit the model in its config "
                   f"({' '.join(first[:2])[:300]})") from None


# ---------------------------------------------------------------------------------------------
# Training

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


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def prepare_model(cfg, device):
    """The ConvMixer to train (its state_dict is what gets saved) and the module to call.

    With --fast on CUDA its depthwise convs run on Triton kernels (same Parameters, swapped in
    place); with --compile the training step calls it through torch.compile. Otherwise both are
    the same. Evaluation calls the model itself, so that eval mode and its batch of 1,000 do
    not make torch.compile build more graphs."""
    model = build_model(model_config(cfg)).to(device)
    if cfg["fast"] and device.type == "cuda":
        from fast_depthwise import use_fast_depthwise
        use_fast_depthwise(model)
    return model, (torch.compile(model) if cfg["compile"] else model)


def epoch_batches(cfg, plan, first_step, data, workers, device):
    """The batches of one epoch from first_step on: (augmented images, labels) on `device`."""
    if cfg["fast"]:
        return device_batches(plan, first_step, data["images"], data["labels"], data["augment"])
    loader = torch.utils.data.DataLoader(
        data["dataset"], batch_sampler=plan.batches(first_step), num_workers=workers,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None)
    return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)


def training_data(cfg, images, labels, device):
    """What epoch_batches needs: per-image CPU transforms, or (--fast) the data on the device."""
    recipe = argparse.Namespace(**cfg)
    if cfg["fast"]:
        from gpu_augment import BatchAugment
        return {"images": images.to(device), "labels": labels.to(device),
                "augment": BatchAugment(CIFAR10_MEAN, CIFAR10_STD, scale=cfg["scale"],
                                        ra_n=cfg["ra_n"], ra_m=cfg["ra_m"], ra_p=cfg["ra_p"],
                                        reprob=cfg["reprob"])}
    return {"dataset": AugmentedImages(images, labels, train_transform(recipe))}


def train_step(net, optimizer, criterion, images, targets, lr, amp, clip, check=True):
    """One AdamW step. Returns (loss, number of images whose top class matches the target's
    largest share), or None, with the weights untouched, if the loss is not finite.
    check=False (the benchmark's measure of what the check costs) skips it and returns None."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
        logits = net(images)
    loss = criterion(logits.float(), targets)
    if check:
        correct = (logits.argmax(1) == targets.argmax(1)).sum()
        loss_value, correct = torch.stack([loss.detach(), correct.float()]).tolist()   # host sync
        if not math.isfinite(loss_value):
            return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), clip)
    optimizer.step()
    return (loss_value, correct) if check else None


def train(args):
    start_time = time.time()
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
                           f"_convmixer_{args.hdim}_{args.depth}_k{args.ksize}_p{args.psize}")
    device = torch.device(args.device)
    state = None
    if args.resume:
        if not (out / "last.pt").exists():
            raise Fail(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
        if not (out / "log.jsonl").exists():
            raise Fail(f"--resume: {out / 'log.jsonl'} does not exist; is {out} a run of train_cifar.py?")
        state = read_checkpoint(out / "last.pt", "--resume")
        cfg = state["recipe"]
        missing = [k for k in RECIPE_KEYS if k not in cfg]
        if missing:
            raise Fail(f"--resume: {out / 'last.pt'} was written by an older train_cifar.py, whose "
                       f"recipe lacks {', '.join(missing)}; this version cannot continue it")
        log_records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                       if line.strip()]
        if state["epoch"] < cfg["epochs"]:
            print(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']} "
                  f"(the recipe is taken from last.pt)")
        elif any(r.get("final") for r in log_records):
            raise Fail(f"--resume: the run in {out} has already finished all its epochs")
        else:       # stopped between the last epoch and the final evaluation: do that now
            print(f"resuming {out}: all {cfg['epochs']} epochs are done; final evaluation and model.pt")
    else:
        cfg = {k: getattr(args, k) for k in RECIPE_KEYS}
    amp = cfg["amp"] and device.type == "cuda"
    torch.manual_seed(cfg["seed"])

    # Data
    if cfg["fake_data"]:
        train_images, train_labels = load_fake(cfg["fake_data"], True, cfg["seed"])
        test_images, test_labels = load_fake(cfg["fake_data"], False, cfg["seed"])
    else:
        train_images, train_labels = load_cifar10(args.data, train=True)
        test_images, test_labels = load_cifar10(args.data, train=False)
    n_all = len(train_images)
    val_images, val_labels = train_images[n_all - cfg["val"]:], train_labels[n_all - cfg["val"]:]
    data = training_data(cfg, train_images[:cfg["n_train"]], train_labels[:cfg["n_train"]], device)
    mix = batch_mixing(argparse.Namespace(**cfg))
    out.mkdir(parents=True, exist_ok=True)      # only now: a missing data set leaves no half-made run

    # Model and optimizer
    model, net = prepare_model(cfg, device)
    optimizer = make_optimizer(model, argparse.Namespace(**cfg))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    steps_per_epoch = cfg["n_train"] // cfg["batch_size"]
    total_steps = cfg["epochs"] * steps_per_epoch
    epoch, first_step, wall_before = 0, 0, 0.0
    sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, first_step, sums, wall_before = state["epoch"], state["step"], state["sums"], state["wall_seconds"]

    start_epoch = epoch
    log_path = out / "log.jsonl"
    if state is None:
        write_log(log_path, {"config": cfg, "versions": {"torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": platform.python_version()},
                  "device": device_name(device), "n_params": sum(p.numel() for p in model.parameters()),
                  "argv": sys.argv}, mode="w")
    else:
        # Drop epoch lines written after last.pt (a kill between the two writes), then say so.
        keep = [r for r in log_records if not r.get("final")
                and not ("train_loss" in r and r["epoch"] > epoch)]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        write_log(log_path, {"resumed": True, "epoch": epoch + 1, "step": first_step,
                             "device": device_name(device), "torch": torch.__version__})

    print(f"ConvMixer-{cfg['hdim']}/{cfg['depth']} k{cfg['ksize']} p{cfg['psize']}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {cfg['n_train']:,} training "
          f"images, {steps_per_epoch} steps/epoch, {cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)} "
          f"on {device_name(device)}"
          f"{' (fast path)' if cfg['fast'] else ''}; writing to {out}")
    stop = StopRequested()
    live = sys.stdout.isatty()

    def save_last(epoch, step, sums):
        save_atomic({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "config": model_config(cfg), "recipe": cfg, "epoch": epoch, "step": step,
                     "sums": sums, "wall_seconds": wall_before + time.time() - start_time},
                    out / "last.pt")

    net.train()
    while epoch < cfg["epochs"]:
        plan = EpochPlan(cfg["n_train"], cfg["batch_size"], cfg["seed"], epoch)
        t0 = time.time()
        step = first_step
        for images, labels in epoch_batches(cfg, plan, first_step, data, args.workers, device):
            torch.default_generator.manual_seed(plan.mix_seeds[step])
            images, targets = mix(images, labels)                       # targets: (B, 10) probabilities
            lr = one_cycle_lr((epoch * steps_per_epoch + step + 1) / total_steps, cfg["lr"])
            result = train_step(net, optimizer, criterion, images, targets, lr, amp, cfg["clip"])
            if result is None:
                kept = (f"the last good checkpoint, {out / 'last.pt'}, was kept" if (out / "last.pt").exists()
                        else "no checkpoint had been written yet")
                raise Fail(f"the loss became nan or inf at epoch {epoch + 1}, step {step + 1}; "
                           f"stopped before updating the weights; {kept}")
            loss, correct = result
            step += 1
            sums["loss"] += loss * len(images)
            sums["correct"] += correct
            sums["seen"] += len(images)
            if live:
                seconds = sums["seconds"] + time.time() - t0
                print(f"\r  epoch {epoch + 1} step {step}/{steps_per_epoch}  loss {loss:.3f}  "
                      f"{sums['seen'] / max(seconds, 1e-9):,.0f} img/s ", end="", flush=True)
            if stop.signum is not None:
                break
        sums["seconds"] += time.time() - t0
        if live:
            print("\r" + " " * 70 + "\r", end="")
        if stop.signum is not None and step < steps_per_epoch:
            save_last(epoch, step, sums)
            raise Interrupted(stop.signum, out, epoch, step)

        record = {"epoch": epoch + 1, "train_loss": sums["loss"] / sums["seen"],
                  "train_acc": 100.0 * sums["correct"] / sums["seen"],
                  "lr": lr, "epoch_seconds": sums["seconds"],
                  "images_per_second": sums["seen"] / sums["seconds"]}
        # Test (and --val) accuracy now and then, for the curve; the result is the final epoch's.
        if epoch + 1 == cfg["epochs"] or args.eval_every and (epoch + 1) % args.eval_every == 0:
            record["test_acc"] = evaluate(model, test_images, test_labels, device, amp)
            if cfg["val"]:
                record["val_acc"] = evaluate(model, val_images, val_labels, device, amp)
        write_log(log_path, record)
        epoch, first_step = epoch + 1, 0
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        save_last(epoch, 0, sums)
        eta = (time.time() - start_time) / (epoch - start_epoch) * (cfg["epochs"] - epoch)
        print(f"epoch {epoch:3d}/{cfg['epochs']}  loss {record['train_loss']:.4f}  "
              f"train {record['train_acc']:5.2f}%  "
              + "".join(f"{name} {record[f'{name}_acc']:5.2f}%  " for name in ("test", "val")
                        if f"{name}_acc" in record)
              + f"lr {lr:.5f}  {record['epoch_seconds']:.1f} s  "
              f"{record['images_per_second']:,.0f} img/s  ETA {format_seconds(eta)}", flush=True)
        if stop.signum is not None and epoch < cfg["epochs"]:   # after the last: finish, seconds
            raise Interrupted(stop.signum, out, epoch, 0)

    test_acc = evaluate(model, test_images, test_labels, device, amp)
    tta_acc = evaluate(model, test_images, test_labels, device, amp, flip_tta=True)
    wall = wall_before + time.time() - start_time
    save_atomic({"state_dict": model.state_dict(), "config": model_config(cfg)}, out / "model.pt")
    final = {"final": True, "test_acc": test_acc, "test_acc_flip_tta": tta_acc,
             "wall_seconds": wall, "device": device_name(device)}
    if cfg["val"]:
        final["val_acc"] = evaluate(model, val_images, val_labels, device, amp)
    write_log(log_path, final)
    print(f"final test accuracy {test_acc:.2f}% (flip-TTA {tta_acc:.2f}%) after {cfg['epochs']} "
          f"epoch{'s' * (cfg['epochs'] != 1)}, {format_seconds(wall)} wall; model: {out / 'model.pt'}")
    return final


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def depthwise_breakdown(args, device, amp, repeats=20):
    """Milliseconds for one depthwise layer of this config, nn.Conv2d vs each Triton algorithm
    ("toeplitz" with stacks of 32 rows, the default fast_depthwise.TOEPLITZ_ROWS, and 256):
    forward, and forward + backward (input and weight gradients)."""
    import fast_depthwise
    side = 32 // args.psize
    conv = nn.Conv2d(args.hdim, args.hdim, args.ksize, groups=args.hdim, padding="same").to(device)
    x = torch.randn(args.batch_size, args.hdim, side, side, device=device, requires_grad=True)
    timings = {}
    default_rows = fast_depthwise.TOEPLITZ_ROWS
    layers = [("native", conv, default_rows),
              ("triton_direct", fast_depthwise.FastDepthwiseConv2d(conv, "direct"), default_rows)]
    if side <= fast_depthwise.TOEPLITZ_MAX_WIDTH:
        layers += [(f"triton_toeplitz_{rows}rows", fast_depthwise.FastDepthwiseConv2d(conv, "toeplitz"), rows)
                   for rows in sorted({32, default_rows, 256})]

    def milliseconds(layer, part):
        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                y = layer(x)
            if part == "forward_backward":
                y.backward(torch.ones_like(y))
        run()
        synchronize(device)
        t = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(device)
        return 1000 * (time.perf_counter() - t) / repeats

    try:
        for name, layer, rows in layers:
            fast_depthwise.TOEPLITZ_ROWS = rows          # read at each launch
            for part in ("forward", "forward_backward"):
                timings[f"{name}_{part}"] = milliseconds(layer, part)
    finally:
        fast_depthwise.TOEPLITZ_ROWS = default_rows
    print("one depthwise layer, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return timings


def profile_steps(run_steps, step_range, device, label, top=12):
    """Where the time of a step goes, from torch.profiler over step_range: the `top` CUDA kernels
    (on a CPU: operators) by their own time, and the sum over all of them, in ms per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    t = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        run_steps(step_range)
        synchronize(device)
    wall, n = time.perf_counter() - t, len(step_range)
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    rows = sorted(((e.key, (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total)
                    / 1000 / n) for e in prof.key_averages() if e.device_type == kind),
                  key=lambda row: -row[1])
    busy = sum(ms for _, ms in rows)
    print(f"{label} path, profile of {n} steps: {busy:.2f} ms busy of {1000 * wall / n:.2f} ms per step "
          f"(profiler on); top {'kernels' if device.type == 'cuda' else 'operators'}:")
    for name, ms in rows[:top]:
        print(f"    {ms:8.3f} ms  {100 * ms / max(busy, 1e-9):5.1f}%  {name[:100]}")
    return {"steps": n, "wall_ms_per_step": 1000 * wall / n, "busy_ms_per_step": busy,
            "top": [{"name": name[:200], "ms_per_step": ms} for name, ms in rows[:top]]}


def benchmark(args):
    """Training throughput of the plain and the fast path for one config, on synthetic data."""
    device = torch.device(args.device)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}_benchmark")
    warmup = 10 if args.compile else 3
    b = args.batch_size
    # The profile covers as many steps as --fast augments at a time (16 at batch 512), so that
    # it sees one augmentation call; at most --bench-steps.
    profiled = min(args.bench_steps, max(1, AUGMENT_CHUNK_IMAGES // b))
    steps = warmup + args.bench_steps + profiled
    amp = args.amp and device.type == "cuda"
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (steps * b, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, N_CLASSES, (steps * b,), generator=g)
    plan = EpochPlan(steps * b, b, args.seed, 0)

    def images_per_second(run_steps):
        """Time run_steps(n) for `warmup` then `bench_steps` steps; images per second."""
        run_steps(range(warmup))
        synchronize(device)
        t = time.perf_counter()
        run_steps(range(warmup, warmup + args.bench_steps))
        synchronize(device)
        return args.bench_steps * b / (time.perf_counter() - t)

    result = {"device": device_name(device), "torch": torch.__version__,
              "config": {"hdim": args.hdim, "depth": args.depth, "ksize": args.ksize,
                         "psize": args.psize, "batch_size": b, "amp": amp, "compile": args.compile,
                         "workers": args.workers}}
    out.mkdir(parents=True, exist_ok=True)

    def save():      # after each path: a run cut short by a time limit keeps what it measured
        save_atomic(json.dumps(result, indent=2) + "\n", out / "benchmark.json",
                    write=lambda text, path: path.write_text(text))

    for path in ("fast", "plain"):       # fast first: the number a cut-short run must not lose
        cfg = {k: getattr(args, k) for k in RECIPE_KEYS} | {"fast": path == "fast", "n_train": steps * b}
        model, net = prepare_model(cfg, device)
        optimizer = make_optimizer(model, args)
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        mix = batch_mixing(args)
        data = training_data(cfg, images, labels, device)
        batches = iter(epoch_batches(cfg, plan, 0, data, args.workers, device))

        def whole_steps(step_range):                   # data, mixing, forward, backward, AdamW
            for step in step_range:
                x, y = next(batches)
                x, target = mix(x, y)
                train_step(net, optimizer, criterion, x, target, args.lr, amp, args.clip)

        fixed_x, fixed_y = mix(*next(iter(epoch_batches(cfg, plan, 0, data, 0, device))))

        def model_steps(step_range, check=True):       # the same batch again and again
            for _ in step_range:
                train_step(net, optimizer, criterion, fixed_x, fixed_y, args.lr, amp, args.clip, check)

        result[f"{path}_img_s"] = images_per_second(whole_steps)
        result[f"{path}_profile"] = profile_steps(whole_steps, range(steps - profiled, steps), device, path)
        result[f"{path}_model_only_img_s"] = images_per_second(model_steps)
        # Without the loss check's host sync the CPU can queue the next step while the GPU works.
        result[f"{path}_model_only_no_sync_img_s"] = images_per_second(lambda r: model_steps(r, False))
        if path == "fast":                              # its data path alone, as training runs it
            def augment_epoch():
                for _ in device_batches(plan, 0, data["images"], data["labels"], data["augment"]):
                    pass

            augment_epoch()
            synchronize(device)
            t = time.perf_counter()
            augment_epoch()
            synchronize(device)
            result["fast_augment_only_img_s"] = plan.steps * b / (time.perf_counter() - t)
        print(f"{path:5s}: {result[f'{path}_img_s']:9,.0f} img/s whole step, "
              f"{result[f'{path}_model_only_img_s']:9,.0f} img/s model only "
              f"({result[f'{path}_model_only_no_sync_img_s']:,.0f} without the host sync)", flush=True)
        save()
    result["speedup"] = result["fast_img_s"] / result["plain_img_s"]
    print(f"fast/plain: {result['speedup']:.2f}x; augmentation alone (fast path): "
          f"{result['fast_augment_only_img_s']:,.0f} img/s on {result['device']}; an epoch of "
          f"CIFAR-10's {N_TRAIN_IMAGES:,} images: plain {N_TRAIN_IMAGES / result['plain_img_s']:.1f} s, "
          f"fast {N_TRAIN_IMAGES / result['fast_img_s']:.1f} s (training only)")
    if device.type == "cuda":
        result["depthwise_ms"] = depthwise_breakdown(args, device, amp)
    save()
    print(f"wrote {out / 'benchmark.json'}")
    return result


class Interrupted(Exception):
    def __init__(self, signum, out, epoch, step):
        super().__init__(f"{signal.Signals(signum).name}: stopped at epoch {epoch + 1}, step {step}; "
                         f"state saved to {out / 'last.pt'}. Continue with: "
                         f"python train_cifar.py --resume --out {out}")
        self.exit_code = 128 + signum


def write_log(path, record, mode="a"):
    with open(path, mode) as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluate_checkpoint(args):
    ckpt = read_checkpoint(args.eval, "--eval")
    config = ckpt["config"]
    try:
        model = build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise Fail(f"--eval {args.eval}: its config does not describe a ConvMixer ({e})") from None
    load_weights(model, ckpt["state_dict"], args.eval, "--eval")
    if list(config.get("mean", CIFAR10_MEAN)) != list(CIFAR10_MEAN) or \
            list(config.get("std", CIFAR10_STD)) != list(CIFAR10_STD):
        raise Fail(f"--eval {args.eval}: it was trained with another normalization than CIFAR-10's")
    device = torch.device(args.device)
    model.to(device)
    if args.fake_data:
        images, labels = load_fake(args.fake_data, False, args.seed)
    else:
        images, labels = load_cifar10(args.data, train=False)
    amp = args.amp and device.type == "cuda"
    acc = evaluate(model, images, labels, device, amp)
    tta = evaluate(model, images, labels, device, amp, flip_tta=True)
    print(f"test accuracy {acc:.2f}% (flip-TTA {tta:.2f}%) on {len(images):,} images: {args.eval}")
    return acc


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.eval:
            evaluate_checkpoint(args)
        elif args.benchmark:
            benchmark(args)
        else:
            train(args)
    except Fail as e:
        sys.exit(f"train_cifar.py: error: {e}")
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
