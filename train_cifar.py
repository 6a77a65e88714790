"""Train ConvMixer on CIFAR-10 with the paper's recipe; resumable, and honest about its result.

    python train_cifar.py --hdim 256 --depth 8 --ksize 9        # the paper's ConvMixer-256/8, 200 epochs
    python train_cifar.py --epochs 2 --subset 2000              # a quick check of the whole pipeline
    python train_cifar.py --resume --out runs/<run>             # continue an interrupted run
    python train_cifar.py --eval runs/<run>/model.pt            # test accuracy of a saved model

The defaults are the authors' CIFAR-10 settings for timm (README, "The training recipe"); the paper
reports 96.03% for ConvMixer-256/8 (k9, p1) after 200 epochs (Table 4); what the main command above
gave here, and on what, is in results/README.md. The machine-dependent defaults (precision, the fast
path, the device) are chosen in one place, choose_for_the_hardware.
The file reads in the order of a run: settings, data and augmentation, model, optimizer, training
loop, evaluation. Randomness is tied to (seed, epoch, image), so a run is the same with any
--workers and an interrupted run (Ctrl-C, SIGTERM) resumes mid-epoch exactly. Writes to --out:
log.jsonl (recipe, a line per epoch, result), model.pt (weights and config), last.pt (for --resume).
Parts: trainer/ (RandAugment's table, the run's files, housekeeping); fast/ (optional speed code).
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from convmixer import ConvMixer
from trainer.files import (after_a_failed_write, read_model, read_resume_state, save_atomic, start_log,
                           triton_version, write_log)
from trainer.housekeeping import (Fail, Interrupted, OneLineErrors, Progress, StopRequested, announce,
                                  check_args, check_precision, data_workers, device_name, format_seconds,
                                  load_fake, non_finite_loss, open_cifar10, parse_noting_given, start_loader)
from trainer.randaugment import RandAugment, randaugment_ops

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_MEAN_PIXEL = [float(round(255 * m)) for m in CIFAR10_MEAN]   # (125, 123, 114): fill colour
N_CLASSES = 10
N_TRAIN_IMAGES = 50_000
CHECK_EVERY = 50        # --step-mode device or graph: steps between reads of the device's sums
# What a run's result depends on; saved in last.pt and log.jsonl, reused by --resume.
RECIPE_KEYS = ["hdim", "depth", "ksize", "psize", "epochs", "batch_size", "lr", "wd", "eps", "clip",
               "label_smoothing", "amp", "amp_dtype", "scale", "ra_n", "ra_m", "ra_mstd", "ra_p", "mixup",
               "cutmix", "reprob", "seed", "fake_data", "subset", "val", "n_train", "fast", "compile",
               "step_mode", "fused_norm"]


# ---------------------------------------------------------------------------------------------
# Settings: the recipe's knobs; trainer/housekeeping.py checks every value (check_args).

# Named recipes: the flags each one sets. "short" starts from the official convmixer-cifar10
# script's 25-epoch setting for ConvMixer-256/8 k5 p2 (lr 0.05, weight decay 0.005, no crop scaling,
# erasing or mixing; RandAugment n 2 at torchvision's magnitude 12, every op applied: rotations up to
# 12 degrees, which is 4 on timm's 0-10 scale), keeping this trainer's label smoothing and clipping.
RECIPES = {
    "paper": {},
    "short": {"ksize": 5, "psize": 2, "epochs": 25, "batch_size": 512, "lr": 0.05, "wd": 0.005, "scale": 1.0,
              "ra_m": 4.0, "ra_mstd": 0.0, "ra_p": 1.0, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0},
}

def parse_args(argv=None):
    p = OneLineErrors(prog="train_cifar.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument_group("model").add_argument
    add("--hdim", type=int, default=256, help="width (channels) h")
    add("--depth", type=int, default=8, help="number of ConvMixer blocks d")
    add("--ksize", type=int, default=9, help="depthwise kernel size k")
    add("--psize", type=int, default=1, help="patch size p")
    add = p.add_argument_group("optimization").add_argument
    add("--epochs", type=int, default=200)
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=0.01, help="peak of the one-cycle schedule")
    add("--wd", type=float, default=0.01, help="AdamW weight decay (weights only)")
    add("--eps", type=float, default=1e-3, help="AdamW epsilon")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    add("--label-smoothing", type=float, default=0.1)
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast (in --amp-dtype)")
    add("--amp-dtype", choices=["auto", "bfloat16", "float16"], default="auto", help="auto: bfloat16 on "
        "GPUs that compute it natively (CUDA compute capability 8.0+), float16 with loss scaling on older "
        "ones (T4, V100, RTX 20xx), float32 on Apple's MPS and on CPUs")
    add = p.add_argument_group("augmentation").add_argument
    add("--scale", type=float, default=0.75, help="RandomResizedCrop min scale")
    add("--ra-n", type=int, default=2, help="RandAugment ops drawn per image")
    add("--ra-m", type=float, default=9, help="RandAugment magnitude, on timm's 0-10 scale")
    add("--ra-mstd", type=float, default=0.5, help="std of the noise drawn on the magnitude per op")
    add("--ra-p", type=float, default=0.5, help="probability that a drawn RandAugment op is applied")
    add("--mixup", type=float, default=0.5, help="MixUp alpha (0: off)")
    add("--cutmix", type=float, default=0.5, help="CutMix alpha (0: off)")
    add("--reprob", type=float, default=0.25, help="RandomErasing probability")
    add = p.add_argument_group("run").add_argument
    add("--recipe", choices=sorted(RECIPES), default="paper", help="a named set of the flags above, "
        "each taken unless given: paper (the defaults), short (25 epochs at batch 512, from the official "
        "convmixer-cifar10 script's quick setting; results/README.md)")
    add("--seed", type=int, default=0, help="all randomness derives from it")
    add("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    add("--fake-data", type=int, metavar="N", default=0,
        help="N synthetic images (FakeData) instead of CIFAR-10, for smoke tests")
    add("--out", help="output folder; when not given, a new folder under runs/")
    add("--device", help="cuda, mps, cpu, cuda:1, ... (default: CUDA, else Apple's MPS, else the CPU)")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    add("--subset", type=int, metavar="N", help="train on the first N training images")
    add("--val", type=int, metavar="N", default=0, help="hold out the last N training images, report on them")
    add("--eval-every", type=int, metavar="N", help="test (and --val) accuracy every N epochs and after "
        "the last (0: after the last only; default: 10, or what the resumed run used)")
    add("--progress-every", type=float, metavar="SECONDS", default=30,
        help="without a terminal, a progress line this often; the whole run's estimate after this long")
    add("--save-every", type=float, metavar="MINUTES", default=2, help="also write last.pt this often "
        "during an epoch, so that a hard kill loses at most this much (0: after every step)")
    add("--resume", action="store_true", help="continue the run in --out from its last.pt, with its recipe "
        "(of the recipe's flags only --step-mode, --compile and --fused-norm may change)")
    add("--eval", metavar="CKPT", help="evaluate a saved model on the test set and exit")
    add = p.add_argument_group("speed (optional; the code is in fast/)").add_argument
    add("--fast", action=argparse.BooleanOptionalAction, help="augment whole batches on the device and, "
        "on CUDA, use Triton depthwise kernels (default: on CUDA with Triton, compute capability 8.0+; "
        "elsewhere the plain reference)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    add("--step-mode", choices=["host", "device", "graph"], help="host: the loss checked every step; "
        "device: checked on the device, no host sync; graph: device, as a CUDA graph (default: graph "
        "with --fast on CUDA, unless --compile; else host)")
    add("--fused-norm", action=argparse.BooleanOptionalAction, default=False, help="GELU -> BatchNorm fused")
    args = parse_noting_given(p, argv)
    for flag, value in RECIPES[args.recipe].items():          # a flag given on the command line wins
        if flag not in args.given:
            setattr(args, flag, value)
    args.device = args.device or default_device()
    try:
        check_args(args, N_TRAIN_IMAGES)
        args.notes = choose_for_the_hardware(args)
    except ValueError as e:
        p.error(str(e))
    return args


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def choose_for_the_hardware(args):
    """The defaults that depend on the machine, all chosen here (a flag that is given wins): the
    precision, whether to take the fast path (fast/) and how it steps. Returns the notes for the run's
    first line on why a GPU runs the plain path."""
    device = torch.device(args.device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    native_bfloat16 = capability is not None and capability >= (8, 0)     # A100, H100, RTX 30xx on
    if args.amp_dtype == "auto":          # older GPUs emulate bfloat16, slowly; float16 they compute
        args.amp_dtype = "float32" if capability is None else "bfloat16" if native_bfloat16 else "float16"
    notes = []
    if args.fast is None:                 # where the fast path is measured to pay (results/README.md)
        args.fast = native_bfloat16 and triton_version() is not None
        if capability and not args.fast:
            notes.append("plain path: " + ("Triton is not installed here" if native_bfloat16 else
                         f"the fast path is tested on compute capability 8.0 or more, this GPU has "
                         f"{capability[0]}.{capability[1]}") + " (--fast asks for it)")
    if args.step_mode is None:            # the graph step: 2.7x the host step at batch 64 on an H200
        args.step_mode = "graph" if args.fast and capability and not args.compile else "host"
    return notes


AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def autocast_dtype(recipe):
    """The dtype the forward pass is autocast to (--amp-dtype), or None: float32 (--no-amp)."""
    return AUTOCAST[recipe.amp_dtype] if recipe.amp else None


# ---------------------------------------------------------------------------------------------
# Data: the whole of CIFAR-10 is 180 MB of uint8, so it is held in memory as tensors.

def load_cifar10(root, train):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)), downloading to `root` if needed."""
    ds = open_cifar10(root, train)    # torchvision's CIFAR10, with one-line errors (no network, ...)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(ds.targets)


def load_data(recipe, root, train):
    """CIFAR-10's training or test set, or with --fake-data its synthetic stand-in."""
    return load_fake(recipe.fake_data, train, recipe.seed) if recipe.fake_data else load_cifar10(root, train)


# RandAugment as timm's "rand-m9-mstd0.5-inc1", the paper's setting: trainer/randaugment.py holds its
# table of 15 ops, each with its magnitude rule. Geometric ops fill with CIFAR-10's mean colour.
RANDAUGMENT_OPS = randaugment_ops(fill=CIFAR10_MEAN_PIXEL)


def randaugment(recipe):
    """The RandAugment stage, uint8 (3, H, W) -> uint8 (3, H, W), drawing from torch's default generator."""
    return RandAugment(RANDAUGMENT_OPS, recipe.ra_n, recipe.ra_m, recipe.ra_mstd, recipe.ra_p)


def train_transform(recipe):
    """Per-image augmentation of a uint8 (3, 32, 32) tensor into a normalized float tensor."""
    crop = [v2.RandomResizedCrop(32, scale=(recipe.scale, 1.0), antialias=True, interpolation=mode)
            for mode in (v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC)]
    return v2.Compose([
        v2.RandomChoice(crop),             # timm draws the interpolation per image
        v2.RandomHorizontalFlip(),
        randaugment(recipe),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        # value="random" fills with N(0, 1) noise in normalized space (timm's "pixel" mode).
        v2.RandomErasing(p=recipe.reprob, value="random"),
    ])


def batch_mixing(recipe):
    """Per batch, MixUp or CutMix (chosen at random); labels become class probabilities."""
    mixers = [m(alpha=alpha, num_classes=N_CLASSES)
              for alpha, m in [(recipe.mixup, v2.MixUp), (recipe.cutmix, v2.CutMix)] if alpha > 0]
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
        torch.default_generator.manual_seed(seed)   # the CPU generator that the transforms draw from
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


def training_data(recipe, images, labels, device):
    """What epoch_batches needs: per-image CPU transforms, or (--fast) the data on the device."""
    if recipe.fast:
        from fast.augment import BatchAugment
        return {"images": images.to(device), "labels": labels.to(device),
                "augment": BatchAugment(RANDAUGMENT_OPS, CIFAR10_MEAN, CIFAR10_STD, scale=recipe.scale,
                                        ra_n=recipe.ra_n, ra_m=recipe.ra_m, ra_mstd=recipe.ra_mstd,
                                        ra_p=recipe.ra_p, reprob=recipe.reprob)}
    return {"dataset": AugmentedImages(images, labels, train_transform(recipe))}


def epoch_batches(recipe, plan, first_step, data, workers, device):
    """The batches of one epoch from first_step on: (augmented images, labels) on `device`."""
    if recipe.fast:
        from fast.augment import device_batches
        return device_batches(plan, first_step, data["images"], data["labels"], data["augment"])
    loader = torch.utils.data.DataLoader(data["dataset"], batch_sampler=plan.batches(first_step),
                                         pin_memory=device.type == "cuda", **data_workers(workers))
    return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in start_loader(loader))


# ---------------------------------------------------------------------------------------------
# Model

def model_config(recipe):
    return {"hdim": recipe.hdim, "depth": recipe.depth, "ksize": recipe.ksize, "psize": recipe.psize,
            "n_classes": N_CLASSES, "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def build_model(config):
    return ConvMixer(config["hdim"], config["depth"], kernel_size=config["ksize"],
                     patch_size=config["psize"], n_classes=config["n_classes"])


def prepare_model(recipe, device):
    """The ConvMixer to train (its state_dict is saved) and the module to call. Triton kernels are
    swapped in place (same Parameters): --fast on CUDA, where Triton is, the depthwise convs';
    --fused-norm GELU -> BatchNorm's. With --compile the training step calls it through torch.compile;
    evaluation calls the model itself (no graphs for eval mode's batches)."""
    model = build_model(model_config(recipe)).to(device)
    if recipe.fast and device.type == "cuda" and triton_version():
        from fast.depthwise import use_fast_depthwise
        use_fast_depthwise(model)
    if recipe.fused_norm:      # on CUDA, or in Triton's interpreter (check_args); not yet in --fast
        from fast.gelu_batchnorm import use_fused_gelu_batch_norm
        use_fused_gelu_batch_norm(model)
    return model, (torch.compile(model) if recipe.compile else model)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule

def make_optimizer(model, recipe, fused=None):
    """AdamW; as timm does by default, no weight decay on biases and BatchNorm (1-D tensors).
    fused (default: on CUDA) is the same update in far fewer kernel launches."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=recipe.lr, eps=recipe.eps, fused=fused or decay[0].is_cuda or None)


def one_cycle_lr(progress, peak):
    """Linear 0 -> peak over the first 2/5 of training, -> peak/20 at 4/5, -> 0 at the end."""
    points = [(0.0, 0.0), (0.4, peak), (0.8, peak / 20), (1.0, 0.0)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if progress <= x1:
            return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)
    return 0.0


# ---------------------------------------------------------------------------------------------
# Training

def train_step(net, optimizer, criterion, images, targets, lr, amp, clip, scaler=None):
    """One AdamW step, the forward pass autocast to `amp` (a dtype, or None for float32). Returns
    (loss, number of images whose top class matches the target's largest share), or None, with the
    weights untouched, if the loss is not finite. The scaler is float16's loss scaling (disabled
    for other precisions, where its calls do nothing but the plain backward and step)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, amp, enabled=amp is not None):
        logits = net(images)
    loss = criterion(logits.float(), targets)
    correct = (logits.argmax(1) == targets.argmax(1)).sum()
    loss_value, correct = torch.stack([loss.detach(), correct.float()]).tolist()   # host sync
    if not math.isfinite(loss_value):
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()         # float16: scaled up, so that small gradients do not vanish
    if clip > 0:
        scaler.unscale_(optimizer)        # clip the true gradients
        nn.utils.clip_grad_norm_(net.parameters(), clip)
    scaler.step(optimizer)                # skipped if a float16 gradient overflowed
    scaler.update()                       # then a smaller scale
    return loss_value, correct


class Run:
    """One training run in --out, new or resumed from its last.pt: recipe, data, model, optimizer,
    and where it stands (epoch, step, running sums of the epoch so far)."""

    def __init__(self, args):
        self.out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
                                    f"_convmixer_{args.hdim}_{args.depth}_k{args.ksize}_p{args.psize}")
        self.device, self.workers = torch.device(args.device), args.workers
        state = read_resume_state(self.out, RECIPE_KEYS, args) if args.resume else None
        recipe = self.recipe = argparse.Namespace(
            **(state["recipe"] if state else {k: getattr(args, k) for k in RECIPE_KEYS}))
        check_precision(recipe, self.device)        # the new run's, or the resumed one's as it goes on
        torch.manual_seed(recipe.seed)
        images, labels = load_data(recipe, args.data, train=True)
        self.test = load_data(recipe, args.data, train=False)
        n = len(images)                                                 # --val: the last images
        self.val = (images[n - recipe.val:], labels[n - recipe.val:]) if recipe.val else None
        self.data = training_data(recipe, images[:recipe.n_train], labels[:recipe.n_train], self.device)
        self.model, self.net = prepare_model(recipe, self.device)
        # --step-mode device or graph: fused AdamW, whose kernel skips the update after a bad loss
        self.optimizer = make_optimizer(self.model, recipe, fused=recipe.step_mode != "host" or None)
        self.mix = batch_mixing(recipe)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.amp = autocast_dtype(recipe)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.steps_per_epoch = recipe.n_train // recipe.batch_size
        self.epoch, self.step, self.wall_before, self.start_time = 0, 0, 0.0, time.time()
        self.sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        self.saved = None                                       # (epoch, step) that last.pt holds
        if state:                  # the weights, BatchNorm's statistics, AdamW's moments, the position
            if "state_dict" in state:          # (a run stopped before its first last.pt has none)
                self.model.load_state_dict(state["state_dict"])
                self.optimizer.load_state_dict(state["optimizer"])
                if self.scaler.is_enabled() and state.get("scaler"):     # float16's loss scale
                    self.scaler.load_state_dict(state["scaler"])
                self.saved = (state["epoch"], state["step"])
            self.epoch, self.step, self.sums = state["epoch"], state["step"], state["sums"]
            self.wall_before = state["wall_seconds"]
        self.device_step = None
        if recipe.step_mode != "host":              # after the optimizer's state is loaded
            from fast.step import make_device_step
            self.device_step = make_device_step(self, graph=recipe.step_mode == "graph")
        # --eval-every when given, else what the resumed run used, else 10
        self.eval_every = (state or {}).get("eval_every", 10) if args.eval_every is None else args.eval_every
        n_params = sum(p.numel() for p in self.model.parameters())
        # --out is created only now, so that a missing data set leaves no half-made run behind.
        where = start_log(self.out, vars(recipe), self.device, n_params, self.eval_every, state)
        self.save_every, self.last_save = 60 * args.save_every, time.time()
        if self.saved is None:          # from here on, --resume has a last.pt to continue from
            self.save_last()
        notes = [] if state else getattr(args, "notes", [])      # why a GPU runs the plain path
        announce(recipe, n_params, self.steps_per_epoch, where, self.out, notes)

    def lr_at(self, steps_done):
        """The one-cycle learning rate of the step after which `steps_done` steps are done."""
        return one_cycle_lr(steps_done / (self.recipe.epochs * self.steps_per_epoch), self.recipe.lr)

    def train_epoch(self, stop, progress):
        """Train the current epoch from the current step, until its end or a requested stop."""
        recipe, sums = self.recipe, self.sums
        plan = EpochPlan(recipe.n_train, recipe.batch_size, recipe.seed, self.epoch)
        if self.device_step:            # --step-mode device or graph: the sums live on the device
            self.device_step.start(self.epoch * plan.steps + self.step, sums["loss"], sums["correct"])
        t0 = time.time()
        for images, labels in epoch_batches(recipe, plan, self.step, self.data, self.workers, self.device):
            torch.default_generator.manual_seed(plan.mix_seeds[self.step])
            images, targets = self.mix(images, labels)                # targets: (B, 10) probabilities
            loss = self.one_step(images, targets, self.lr_at(self.epoch * plan.steps + self.step + 1))
            self.step += 1
            sums["seen"] += len(images)
            progress.step(self.epoch, self.step, loss)
            if stop.signum is not None:
                break
            save = time.time() - self.last_save >= self.save_every     # a hard kill loses at most this
            if save or self.step % CHECK_EVERY == 0:
                self.sync()
            if save:
                sums["seconds"], t0 = sums["seconds"] + time.time() - t0, time.time()
                self.save_last()
        self.sync()
        sums["seconds"] += time.time() - t0
        progress.end_epoch()

    def one_step(self, images, targets, lr):
        """One training step; its loss (with --step-mode device or graph, a device tensor)."""
        if self.device_step:
            return self.device_step(images, targets, lr)
        result = train_step(self.net, self.optimizer, self.criterion, images, targets, lr, self.amp,
                            self.recipe.clip, self.scaler)
        if result is None:
            raise non_finite_loss(self.epoch * self.steps_per_epoch + self.step + 1, self.steps_per_epoch,
                                  self.out)
        self.sums["loss"] += result[0] * len(images)
        self.sums["correct"] += result[1]
        return result[0]

    def sync(self):
        """--step-mode device or graph: the epoch's sums from the device; stop at a non-finite loss."""
        if self.device_step:
            self.sums["loss"], self.sums["correct"], bad = self.device_step.read()
            if bad is not None:
                raise non_finite_loss(bad, self.steps_per_epoch, self.out)

    def accuracies(self, flip_tta=False):
        """Test (and --val) accuracy of the model as it is now; with flip_tta, the flip-TTA one too."""
        tested = evaluate(self.model, *self.test, self.device, self.amp, flip_tta)
        result = dict(zip(["test_acc", "test_acc_flip_tta"], tested))
        if self.val:
            result["val_acc"] = evaluate(self.model, *self.val, self.device, self.amp)[0]
        return result

    def save_last(self):
        save_atomic({"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "config": model_config(self.recipe),
                     "recipe": vars(self.recipe), "epoch": self.epoch, "step": self.step, "sums": self.sums,
                     "wall_seconds": self.wall_seconds(), "eval_every": self.eval_every},
                    self.out / "last.pt")
        self.saved, self.last_save = (self.epoch, self.step), time.time()

    def wall_seconds(self):
        return self.wall_before + time.time() - self.start_time


def train(args):
    stop = StopRequested()                # from the start: a SIGTERM while loading still saves
    run = Run(args)
    with after_a_failed_write(run):       # a full disk, say: one line, what is intact, how to go on
        return train_epochs(run, args, stop)


def train_epochs(run, args, stop):
    recipe = run.recipe
    progress = Progress(recipe, run.epoch * run.steps_per_epoch + run.step, args.progress_every, run.device)
    while run.epoch < recipe.epochs:
        run.train_epoch(stop, progress)
        if stop.signum is not None and run.step < run.steps_per_epoch:
            run.save_last()
            raise Interrupted(stop.signum, run.out, run.epoch, run.step)
        sums, epoch, lr = run.sums, run.epoch + 1, run.lr_at(run.epoch * run.steps_per_epoch + run.step)
        record = {"epoch": epoch, "train_loss": sums["loss"] / sums["seen"],
                  "train_acc": 100.0 * sums["correct"] / sums["seen"], "lr": lr,
                  "epoch_seconds": sums["seconds"], "images_per_second": sums["seen"] / sums["seconds"]}
        # Test (and --val) accuracy now and then, for the curve; the result is the final epoch's.
        if epoch == recipe.epochs or run.eval_every and epoch % run.eval_every == 0:
            record.update(run.accuracies())
        write_log(run.out / "log.jsonl", record)
        run.epoch, run.step, run.sums = epoch, 0, {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        run.save_last()
        progress.end_of_epoch(record)
        if stop.signum is not None and epoch < recipe.epochs:   # after the last: finish, seconds
            raise Interrupted(stop.signum, run.out, epoch, 0)
    final = {"final": True, **run.accuracies(flip_tta=True), "wall_seconds": run.wall_seconds(),
             "device": device_name(run.device)}
    save_atomic({"state_dict": run.model.state_dict(), "config": model_config(recipe)}, run.out / "model.pt")
    write_log(run.out / "log.jsonl", final)
    print(f"final test accuracy {final['test_acc']:.2f}% (flip-TTA {final['test_acc_flip_tta']:.2f}%) "
          f"after {recipe.epochs} epoch{'s' * (recipe.epochs != 1)}, "
          f"{format_seconds(final['wall_seconds'])} wall; model: {run.out / 'model.pt'}")
    return final


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict(model, images, device, amp, mirror=False, batch_size=None):
    """The logits (N, classes) of `model` in eval mode for uint8 images (N, 3, H, W), float32 on the
    CPU; with mirror, of the images flipped left to right. On a CPU, batches of 20: ConvMixer-256/8
    p1 takes 27 ms an image there (2 cores), 48 ms at 100, each layer's output then fresh memory."""
    batch_size = batch_size or (1000 if device.type == "cuda" else 20)
    model.eval()
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CIFAR10_MEAN, CIFAR10_STD))
    logits = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        x = (x.float() / 255 - mean) / std
        x = x.flip(3) if mirror else x                        # (B, C, H, W): 3 is the width
        with torch.autocast(device.type, amp, enabled=amp is not None):
            logits.append(model(x).float().cpu())
    model.train()
    return torch.cat(logits)


def evaluate(model, images, labels, device, amp, flip_tta=False):
    """[accuracy (%)] of `model` on uint8 images; with flip_tta [accuracy, flip-TTA accuracy], where
    flip-TTA adds the logits of each image's mirror to its own: one more pass over the images."""
    logits = [predict(model, images, device, amp)]
    if flip_tta:
        logits.append(logits[0] + predict(model, images, device, amp, mirror=True))
    return [100.0 * (each.argmax(1) == labels).sum().item() / len(labels) for each in logits]


def evaluate_checkpoint(args):
    model = read_model(args.eval, "--eval", build_model, CIFAR10_MEAN, CIFAR10_STD)
    device = torch.device(args.device)
    images, labels = load_data(args, args.data, train=False)
    print(f"evaluating {args.eval}: {len(images):,} test images and their mirrors on "
          f"{device_name(device)}", flush=True)
    acc, tta = evaluate(model.to(device), images, labels, device, autocast_dtype(args), True)
    print(f"test accuracy {acc:.2f}% (flip-TTA {tta:.2f}%) on {len(images):,} images: {args.eval}")
    return acc


def main(argv=None):
    args = parse_args(argv)
    try:
        (evaluate_checkpoint if args.eval else train)(args)
    except Fail as e:
        sys.exit(f"train_cifar.py: error: {e}")
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
