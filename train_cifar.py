"""Train ConvMixer on CIFAR-10 with the paper's recipe; resumable, and honest about its result.

    python train_cifar.py --hdim 256 --depth 8 --ksize 9        # the paper's ConvMixer-256/8, 200 epochs
    python train_cifar.py --epochs 2 --subset 2000              # a quick check of the whole pipeline
    python train_cifar.py --resume --out runs/<run>             # continue an interrupted run
    python train_cifar.py --eval runs/<run>/model.pt            # test accuracy of a saved model

The defaults are the authors' CIFAR-10 settings for timm (README, "The training recipe"); the paper
reports 96.03% for ConvMixer-256/8 (k9, p1) after 200 epochs (Table 4). Evidence here so far
(README, Results; results/): ConvMixer-256/8 k5 p2, 25 epochs at batch 512: 87.43% in 3m17s on an
NVIDIA H200 (torch 2.11), 87.22% in 1m05s with --fast; the full 200-epoch run is not recorded yet.
The file reads in the order of a run: settings, data and augmentation, model, optimizer, training
loop, evaluation. Randomness is tied to (seed, epoch, image), so a run is the same with any
--workers and an interrupted run (Ctrl-C, SIGTERM) resumes mid-epoch exactly. Writes to --out:
log.jsonl (recipe, a line per epoch, result), model.pt (weights and config), last.pt (for --resume).
In trainer/: the RandAugment op table, and the housekeeping (flag checks, files, progress, Ctrl-C).
The optional speed code (--fast, --benchmark) is in fast/.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from convmixer import ConvMixer
from trainer.housekeeping import (Fail, Interrupted, OneLineErrors, Progress, StopRequested, check_args,
                                  device_name, format_seconds, ignore_sigint, read_checkpoint,
                                  read_resume_state, save_atomic, start_log, write_log)
from trainer.randaugment import RandAugment, randaugment_ops

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR10_MEAN_PIXEL = [float(round(255 * m)) for m in CIFAR10_MEAN]   # (125, 123, 114): fill colour
N_CLASSES = 10
N_TRAIN_IMAGES = 50_000
# What a run's result depends on; saved in last.pt and log.jsonl, reused by --resume.
RECIPE_KEYS = ["hdim", "depth", "ksize", "psize", "epochs", "batch_size", "lr", "wd", "eps", "clip",
               "label_smoothing", "amp", "scale", "ra_n", "ra_m", "ra_mstd", "ra_p", "mixup", "cutmix",
               "reprob", "seed", "fake_data", "subset", "val", "n_train", "fast", "compile"]


# ---------------------------------------------------------------------------------------------
# Settings: the recipe's knobs; trainer/housekeeping.py checks every value (check_args).

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
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast on CUDA")
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
    add("--seed", type=int, default=0, help="all randomness derives from it")
    add("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    add("--fake-data", type=int, metavar="N", default=0,
        help="N synthetic images (FakeData) instead of CIFAR-10, for smoke tests")
    add("--out", help="output folder; when not given, a new folder under runs/")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    add("--subset", type=int, metavar="N", help="train on the first N training images")
    add("--val", type=int, metavar="N", default=0, help="hold out the last N training images, report on them")
    add("--eval-every", type=int, metavar="N", default=10,
        help="test (and --val) accuracy every N epochs and after the last (0: after the last only)")
    add("--progress-every", type=float, metavar="SECONDS", default=30,
        help="without a terminal, a progress line this often; the whole run's estimate after this long")
    add("--resume", action="store_true", help="continue the run in --out from its last.pt and recipe")
    add("--eval", metavar="CKPT", help="evaluate a saved model on the test set and exit")
    add = p.add_argument_group("speed (optional; the code is in fast/)").add_argument
    add("--fast", action=argparse.BooleanOptionalAction, default=False,
        help="augment whole batches on the device; on CUDA also the Triton depthwise convolution")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--benchmark", action="store_true", help="time plain and fast training steps, then exit")
    add("--bench-steps", type=int, default=30, help="timed steps per path")
    args = p.parse_args(argv)
    try:
        check_args(args, N_TRAIN_IMAGES)
    except ValueError as e:
        p.error(str(e))
    return args


# ---------------------------------------------------------------------------------------------
# Data: the whole of CIFAR-10 is 180 MB of uint8, so it is held in memory as tensors.

def load_cifar10(root, train):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)), downloading to `root` if needed."""
    folder = Path(root) / "cifar-10-batches-py"
    if Path(root).exists() and not Path(root).is_dir():
        raise Fail(f"--data {root} is a file; give the folder that holds (or will hold) cifar-10-batches-py")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=True)
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
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(ds.targets)


def load_fake(n, train, seed):
    """torchvision FakeData in the same format, for smoke tests without CIFAR-10."""
    ds = torchvision.datasets.FakeData(n if train else max(n // 5, 1), (3, 32, 32), N_CLASSES,
                                       random_offset=seed + (0 if train else 10**6))
    images = torch.stack([F.pil_to_tensor(ds[i][0]) for i in range(len(ds))])
    return images, torch.tensor([int(ds[i][1]) for i in range(len(ds))])


# RandAugment as timm's "rand-m9-mstd0.5-inc1", the paper's setting: trainer/randaugment.py holds its
# table of 15 ops, each with its magnitude rule. Geometric ops fill with CIFAR-10's mean colour.
RANDAUGMENT_OPS = randaugment_ops(fill=CIFAR10_MEAN_PIXEL)


def randaugment(recipe):
    """The RandAugment stage: a callable from a uint8 (3, H, W) image to one, drawing from torch's
    default generator."""
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
    loader = torch.utils.data.DataLoader(
        data["dataset"], batch_sampler=plan.batches(first_step), num_workers=workers,
        pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint if workers else None)
    return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)


# ---------------------------------------------------------------------------------------------
# Model

def model_config(recipe):
    return {"hdim": recipe.hdim, "depth": recipe.depth, "ksize": recipe.ksize, "psize": recipe.psize,
            "n_classes": N_CLASSES, "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def build_model(config):
    return ConvMixer(config["hdim"], config["depth"], kernel_size=config["ksize"],
                     patch_size=config["psize"], n_classes=config["n_classes"])


def prepare_model(recipe, device):
    """The ConvMixer to train (its state_dict is what gets saved) and the module to call.

    With --fast on CUDA its depthwise convs run on Triton kernels (same Parameters, swapped in
    place); with --compile the training step calls it through torch.compile. Evaluation calls the
    model itself, so that eval mode and its batch of 1,000 do not make torch.compile build more graphs."""
    model = build_model(model_config(recipe)).to(device)
    if recipe.fast and device.type == "cuda":
        from fast.depthwise import use_fast_depthwise
        use_fast_depthwise(model)
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


class Run:
    """One training run in --out, new or resumed from its last.pt: recipe, data, model, optimizer,
    and where it stands (epoch, step, running sums of the epoch so far)."""

    def __init__(self, args):
        self.out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
                                    f"_convmixer_{args.hdim}_{args.depth}_k{args.ksize}_p{args.psize}")
        self.device, self.workers = torch.device(args.device), args.workers
        state = read_resume_state(self.out, RECIPE_KEYS) if args.resume else None
        recipe = self.recipe = argparse.Namespace(
            **(state["recipe"] if state else {k: getattr(args, k) for k in RECIPE_KEYS}))
        torch.manual_seed(recipe.seed)
        if recipe.fake_data:
            (images, labels), self.test = (load_fake(recipe.fake_data, t, recipe.seed) for t in (True, False))
        else:
            (images, labels), self.test = (load_cifar10(args.data, train=t) for t in (True, False))
        n = len(images)                                                 # --val: the last images
        self.val = (images[n - recipe.val:], labels[n - recipe.val:]) if recipe.val else None
        self.data = training_data(recipe, images[:recipe.n_train], labels[:recipe.n_train], self.device)
        self.model, self.net = prepare_model(recipe, self.device)
        self.optimizer, self.mix = make_optimizer(self.model, recipe), batch_mixing(recipe)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.amp = recipe.amp and self.device.type == "cuda"
        self.steps_per_epoch = recipe.n_train // recipe.batch_size
        self.epoch, self.step, self.lr, self.wall_before, self.start_time = 0, 0, 0.0, 0.0, time.time()
        self.sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        if state:                  # the weights, BatchNorm's statistics, AdamW's moments, the position
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.step, self.sums = state["epoch"], state["step"], state["sums"]
            self.wall_before = state["wall_seconds"]
        n_params = sum(p.numel() for p in self.model.parameters())
        # --out is created only now, so that a missing data set leaves no half-made run behind.
        start_log(self.out, vars(recipe), self.device, n_params, state)
        print(f"ConvMixer-{recipe.hdim}/{recipe.depth} k{recipe.ksize} p{recipe.psize}: "
              f"{n_params:,} parameters; {recipe.n_train:,} "
              f"training images, {self.steps_per_epoch} steps/epoch, {recipe.epochs} "
              f"epoch{'s' * (recipe.epochs != 1)} on {device_name(self.device)}"
              f"{' (fast path)' if recipe.fast else ''}; writing to {self.out}", flush=True)

    def train_epoch(self, stop, progress):
        """Train the current epoch from the current step, until its end or a requested stop."""
        recipe, sums = self.recipe, self.sums
        plan = EpochPlan(recipe.n_train, recipe.batch_size, recipe.seed, self.epoch)
        t0 = time.time()
        for images, labels in epoch_batches(recipe, plan, self.step, self.data, self.workers, self.device):
            torch.default_generator.manual_seed(plan.mix_seeds[self.step])
            images, targets = self.mix(images, labels)                # targets: (B, 10) probabilities
            self.lr = one_cycle_lr((self.epoch * plan.steps + self.step + 1) / (recipe.epochs * plan.steps),
                                   recipe.lr)
            result = train_step(self.net, self.optimizer, self.criterion, images, targets, self.lr,
                                self.amp, recipe.clip)
            if result is None:
                last = self.out / "last.pt"
                kept = f"the last good checkpoint, {last}, was kept" if last.exists() else \
                    "no checkpoint had been written yet"
                raise Fail(f"the loss became nan or inf at epoch {self.epoch + 1}, step {self.step + 1}; "
                           f"stopped before updating the weights; {kept}")
            self.step += 1
            sums["loss"], sums["correct"] = sums["loss"] + result[0] * len(images), sums["correct"] + result[1]
            sums["seen"] += len(images)
            progress.step(self.epoch, self.step, result[0])
            if stop.signum is not None:
                break
        sums["seconds"] += time.time() - t0
        progress.end_epoch()

    def accuracies(self, flip_tta=False):
        """Test accuracy (and --val accuracy, when held out) of the model as it is now."""
        result = {"test_acc": evaluate(self.model, *self.test, self.device, self.amp)}
        if flip_tta:
            result["test_acc_flip_tta"] = evaluate(self.model, *self.test, self.device, self.amp, True)
        if self.val:
            result["val_acc"] = evaluate(self.model, *self.val, self.device, self.amp)
        return result

    def save_last(self):
        save_atomic({"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "config": model_config(self.recipe), "recipe": vars(self.recipe), "epoch": self.epoch,
                     "step": self.step, "sums": self.sums, "wall_seconds": self.wall_seconds()},
                    self.out / "last.pt")

    def wall_seconds(self):
        return self.wall_before + time.time() - self.start_time


def train(args):
    run, stop = Run(args), StopRequested()
    recipe = run.recipe
    progress = Progress(recipe, run.epoch * run.steps_per_epoch + run.step, args.progress_every, run.device)
    while run.epoch < recipe.epochs:
        run.train_epoch(stop, progress)
        if stop.signum is not None and run.step < run.steps_per_epoch:
            run.save_last()
            raise Interrupted(stop.signum, run.out, run.epoch, run.step)
        sums, epoch = run.sums, run.epoch + 1
        record = {"epoch": epoch, "train_loss": sums["loss"] / sums["seen"],
                  "train_acc": 100.0 * sums["correct"] / sums["seen"], "lr": run.lr,
                  "epoch_seconds": sums["seconds"], "images_per_second": sums["seen"] / sums["seconds"]}
        # Test (and --val) accuracy now and then, for the curve; the result is the final epoch's.
        if epoch == recipe.epochs or args.eval_every and epoch % args.eval_every == 0:
            record.update(run.accuracies())
        write_log(run.out / "log.jsonl", record)
        run.epoch, run.step, run.sums = epoch, 0, {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        run.save_last()
        print(f"epoch {epoch:3d}/{recipe.epochs}  loss {record['train_loss']:.4f}  "
              f"train {record['train_acc']:5.2f}%  "
              + "".join(f"{k[:-4]} {record[k]:5.2f}%  " for k in ("test_acc", "val_acc") if k in record)
              + f"lr {run.lr:.5f}  {record['epoch_seconds']:.1f} s  "
              f"{record['images_per_second']:,.0f} img/s", flush=True)
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
                logits += model(x.flip(3)).float()            # (B, C, H, W): 3 is the width
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    model.train()
    return 100.0 * correct / len(images)


def evaluate_checkpoint(args):
    ckpt = read_checkpoint(args.eval, "--eval")
    config = ckpt["config"]
    try:
        model = build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise Fail(f"--eval {args.eval}: its config does not describe a ConvMixer ({e})") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise Fail(f"--eval {args.eval}: its weights do not fit the model in its config "
                   f"({' '.join(str(e).strip().splitlines()[:2])[:300]})") from None
    if list(config.get("mean", CIFAR10_MEAN)) != list(CIFAR10_MEAN) or \
            list(config.get("std", CIFAR10_STD)) != list(CIFAR10_STD):
        raise Fail(f"--eval {args.eval}: it was trained with another normalization than CIFAR-10's")
    device = torch.device(args.device)
    images, labels = load_fake(args.fake_data, False, args.seed) if args.fake_data else \
        load_cifar10(args.data, train=False)
    amp = args.amp and device.type == "cuda"
    acc = evaluate(model.to(device), images, labels, device, amp)
    tta = evaluate(model, images, labels, device, amp, flip_tta=True)
    print(f"test accuracy {acc:.2f}% (flip-TTA {tta:.2f}%) on {len(images):,} images: {args.eval}")
    return acc



def main(argv=None):
    args = parse_args(argv)
    try:
        if args.eval:
            evaluate_checkpoint(args)
        elif args.benchmark:
            from fast.benchmark import benchmark
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
