"""Train ConvMixer on CIFAR-10 with the paper's recipe: the whole trainer, top to bottom.

    python train_cifar.py --hdim 256 --depth 8 --ksize 9      # the main job: ConvMixer-256/8, 200 epochs
    python train_cifar.py --hdim 32 --depth 2 --ksize 5 --psize 2 --epochs 2 --subset 2000   # smoke run
    python train_cifar.py --resume --out runs/<run>           # continue a stopped run
    python train_cifar.py --eval runs/<run>/model.pt          # test accuracy of a saved model

The defaults are the timm flags of the ConvMixer-256/8 run in locuslab/convmixer issue #15 (95.89%
there), which take the official README's CIFAR-10 hint, --scale 0.75; the paper reports 96.03%
(Table 4). What this script gave is in results/README.md.

It reads in the order of a run: settings, data, augmentation and mixing, model and optimizer, the
step, the loop, evaluation. The epoch is the unit of work: everything random in an epoch comes from
(seed, epoch), and after each one the run writes last.pt, then log.jsonl, each atomically. A kill
loses at most the epoch in progress; --resume replays it and ends as an uninterrupted run would.
--fast (fast/, CUDA) augments whole batches on the GPU and replays the step as a CUDA graph.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from convmixer import ConvMixer
from housekeeping import (Fail, check_args, choose_for_the_hardware, hms, number, open_cifar10, read_checkpoint,
                          save_atomic, where_it_runs)
from randaugment import RandAugment, randaugment_ops

MEAN = (0.4914, 0.4822, 0.4465)           # CIFAR-10's channel means and standard deviations
STD = (0.2471, 0.2435, 0.2616)
N_CLASSES = 10
PROGRESS_SECONDS = 30                     # a progress line this often within an epoch

# ---------------------------------------------------------------------------------------------
# Settings

# Named recipes: the flags each sets unless given. "short" is the official convmixer-cifar10
# script's 25-epoch setting (ConvMixer-256/8 k5 p2, lr 0.05, wd 0.005, no crop scaling, mixing or
# erasing, RandAugment n 2 at torchvision's magnitude 12, i.e. 4 on timm's scale, every op applied).
RECIPES = {"paper": {},
           "short": {"ksize": 5, "psize": 2, "epochs": 25, "batch_size": 512, "lr": 0.05, "wd": 0.005,
                     "scale": 1.0, "ra_m": 4.0, "ra_mstd": 0.0, "ra_p": 1.0, "mixup": 0.0, "cutmix": 0.0,
                     "reprob": 0.0}}
WHERE = {"resume", "out", "data", "device", "workers"}   # what --resume takes; the recipe is the run's
POSITIVE, COUNT, FRACTION = number(int, 1), number(int, 0), number(float, 0, 1)
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}   # --amp-dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_cifar.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"train_cifar.py: error: {message} (see --help)\n")
    add = p.add_argument_group("model").add_argument
    add("--hdim", type=POSITIVE, default=256, help="width (channels) h")
    add("--depth", type=POSITIVE, default=8, help="number of ConvMixer blocks d")
    add("--ksize", type=POSITIVE, default=9, help="depthwise kernel size k")
    add("--psize", type=number(int, 1, 32), default=1, help="patch size p")
    add = p.add_argument_group("optimization").add_argument
    add("--epochs", type=POSITIVE, default=200)
    add("--batch-size", type=POSITIVE, default=64)
    add("--lr", type=number(float, 0, above=True), default=0.01, help="peak of the one-cycle schedule")
    add("--wd", type=number(float, 0), default=0.01, help="AdamW weight decay (weights only)")
    add("--eps", type=number(float, 0, above=True), default=1e-3, help="AdamW epsilon")
    add("--clip", type=number(float, 0), default=1.0, help="gradient-norm clipping (0: off)")
    add("--label-smoothing", type=FRACTION, default=0.1)
    add("--amp-dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="autocast to: "
        "auto is bfloat16 on GPUs of compute capability 8.0+, float16 with loss scaling on older ones, "
        "float32 (no autocast) on MPS and CPUs")
    add = p.add_argument_group("augmentation").add_argument
    add("--scale", type=number(float, 0, 1, above=True), default=0.75, help="RandomResizedCrop min scale")
    add("--ra-n", type=COUNT, default=2, help="RandAugment ops drawn per image")
    add("--ra-m", type=number(float, 0, 10), default=9, help="RandAugment magnitude, timm's 0-10 scale")
    add("--ra-mstd", type=number(float, 0), default=0.5, help="std of the noise on the magnitude per op")
    add("--ra-p", type=FRACTION, default=0.5, help="probability that a drawn RandAugment op is applied")
    add("--mixup", type=number(float, 0), default=0.5, help="MixUp alpha (0: off)")
    add("--cutmix", type=number(float, 0), default=0.5, help="CutMix alpha (0: off)")
    add("--reprob", type=FRACTION, default=0.25, help="RandomErasing probability, per image after mixing")
    add = p.add_argument_group("run").add_argument
    add("--recipe", choices=sorted(RECIPES), default="paper", help="a named set of the flags above, each "
        "taken unless given: paper (the defaults) or short (25 epochs at batch 512; not yet run)")
    add("--seed", type=number(int, 0, 2**32 - 1), default=0, help="all randomness derives from it")
    add("--data", default="./data", help="CIFAR-10 root (downloaded if missing)")
    add("--fake-data", type=COUNT, metavar="N", default=0, help="N synthetic images instead of CIFAR-10")
    add("--subset", type=POSITIVE, metavar="N", help="train on the first N training images")
    add("--val", type=COUNT, metavar="N", default=0, help="hold out the last N training images, report on them")
    add("--eval-every", type=COUNT, metavar="N", default=10, help="test accuracy every N epochs and after the last")
    add("--out", help="output folder (default: a new folder under runs/)")
    add("--device", help="cuda, cuda:1, mps, cpu (default: CUDA, else MPS, else the CPU)")
    add("--workers", type=COUNT, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    add("--resume", action="store_true", help="continue the run in --out from its last.pt, with its recipe")
    add("--eval", metavar="CKPT", help="evaluate a saved model on the test set and exit")
    add("--fast", action=argparse.BooleanOptionalAction, help="augment whole batches on the device and, on "
        "CUDA, run Triton depthwise kernels in a CUDA graph (default: on the GPUs it was measured on)")
    args = p.parse_args(argv)
    p.set_defaults(**RECIPES[args.recipe])                # then a flag given wins over the recipe
    args = p.parse_args(argv)
    unset = object()                                      # a default no flag can give
    p.set_defaults(**dict.fromkeys(vars(args), unset))
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}    # the flags given
    try:
        check_args(args, given, WHERE)
        args.notes = choose_for_the_hardware(args)
    except ValueError as e:
        p.error(str(e))
    return args


# ---------------------------------------------------------------------------------------------
# Data: all of CIFAR-10 is 180 MB of uint8, held in memory as tensors.

def load_data(args, train):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of CIFAR-10 in --data, or of --fake-data."""
    if args.fake_data:
        n = args.fake_data if train else max(args.fake_data // 5, 1)
        fake = torchvision.datasets.FakeData(n, (3, 32, 32), N_CLASSES, v2.PILToTensor(),
                                             random_offset=args.seed + (0 if train else 10**6))
        return torch.stack([x for x, _ in fake]), torch.tensor([int(y) for _, y in fake])
    ds = open_cifar10(args.data, train)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


# ---------------------------------------------------------------------------------------------
# Augmentation and mixing. RandAugment is timm's "rand-m9-mstd0.5-inc1", op by op (randaugment.py).

RANDAUGMENT_OPS = randaugment_ops(fill=[float(round(255 * m)) for m in MEAN])   # fill: the mean colour


def train_transform(args):
    """One uint8 (3, 32, 32) training image -> normalized float32; erasing comes after mixing."""
    crops = [v2.RandomResizedCrop(32, scale=(args.scale, 1.0), interpolation=mode, antialias=True)
             for mode in (v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC)]
    return v2.Compose([v2.RandomChoice(crops),           # timm draws the interpolation per image
                       v2.RandomHorizontalFlip(),
                       RandAugment(RANDAUGMENT_OPS, args.ra_n, args.ra_m, args.ra_mstd, args.ra_p),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def batch_mixing(args):
    """Per batch, MixUp or CutMix (one of them at random); labels become class probabilities (B, 10)."""
    mixers = [mixer(alpha=alpha, num_classes=N_CLASSES)
              for alpha, mixer in [(args.mixup, v2.MixUp), (args.cutmix, v2.CutMix)] if alpha > 0]
    if not mixers:
        return lambda images, labels: (images, nn.functional.one_hot(labels, N_CLASSES).float())
    return v2.RandomChoice(mixers)


def erase_each(images, p):
    """RandomErasing of each image of a mixed batch on its own, the box filled with N(0, 1) noise, as
    timm's loader does after mixing."""
    eraser = v2.RandomErasing(p=p, value="random")
    return torch.stack([eraser(image) for image in images]) if p > 0 else images


class AugmentedImages(torch.utils.data.Dataset):
    """Items are (index, seed): an image's augmentation depends on its own seed alone, so a run is
    the same with any --workers."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        torch.default_generator.manual_seed(seed)      # the generator the transforms draw from
        return self.transform(self.images[index]), self.labels[index]


def training_data(args, images, labels, device):
    """The training images as the batches need them: per-image transforms, or (--fast) on the device."""
    if args.fast:
        from fast.augment import DeviceData
        return DeviceData(images, labels, args, RANDAUGMENT_OPS, MEAN, STD, device)
    return AugmentedImages(images, labels, train_transform(args))


def epoch_batches(args, data, epoch, device):
    """The epoch's batches on `device`: augmented, mixed and erased images (B, 3, 32, 32) and their
    targets (B, 10), all drawn from (seed, epoch)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    b, steps = args.batch_size, args.n_train // args.batch_size     # the last partial batch is dropped
    order = torch.randperm(args.n_train, generator=g)
    image_seeds = torch.randint(2**62, (args.n_train,), generator=g)
    step_seeds = torch.randint(2**62, (steps,), generator=g).tolist()
    if args.fast:
        batches, erase = data.batches(order, image_seeds, b, steps), data.erase
    else:
        pairs = list(zip(order.tolist(), image_seeds.tolist()))
        batches = torch.utils.data.DataLoader(          # forked workers start with the data in memory
            data, batch_sampler=[pairs[s * b:(s + 1) * b] for s in range(steps)], num_workers=args.workers,
            pin_memory=device.type == "cuda",
            multiprocessing_context="fork" if args.workers and sys.platform == "linux" else None)
        erase = erase_each
    mix = batch_mixing(args)
    for (images, labels), seed in zip(batches, step_seeds):
        torch.manual_seed(seed)                          # this step's mixing and erasing, CPU and GPU
        images, targets = mix(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        yield erase(images, args.reprob), targets


# ---------------------------------------------------------------------------------------------
# Model, optimizer and schedule

def model_config(args):
    return {"hdim": args.hdim, "depth": args.depth, "ksize": args.ksize, "psize": args.psize,
            "n_classes": N_CLASSES, "mean": list(MEAN), "std": list(STD)}


def build_model(config):
    return ConvMixer(config["hdim"], config["depth"], kernel_size=config["ksize"],
                     patch_size=config["psize"], n_classes=config["n_classes"])


def make_optimizer(model, args):
    """AdamW without weight decay on biases and BatchNorm (1-D tensors), as timm does; fused on CUDA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, eps=args.eps, fused=decay[0].is_cuda or None)


def one_cycle_lr(progress, peak):
    """Linear 0 -> peak over the first 2/5 of training, -> peak/20 at 4/5, -> 0 at the end."""
    points = [(0.0, 0.0), (0.4, peak), (0.8, peak / 20), (1.0, 0.0)]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if progress <= x1:
            return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)
    return 0.0


# ---------------------------------------------------------------------------------------------
# The training step and the loop

def train_step(model, optimizer, scaler, criterion, images, targets, lr, amp, clip):
    """One AdamW step, the forward pass autocast to `amp` (None: float32). Returns the loss and the
    number of images whose top class is the target's largest share, as device tensors (read once an
    epoch: no host sync here). The scaler is float16's loss scaling; in other precisions its calls
    are the plain backward and step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, amp, enabled=amp is not None):
        logits = model(images)
    loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()                  # float16: scaled up, so small gradients survive
    if clip > 0:
        scaler.unscale_(optimizer)                 # clip the true gradients
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)                         # skipped if a float16 gradient overflowed
    scaler.update()
    return loss.detach(), (logits.argmax(1) == targets.argmax(1)).sum()


def train(args):
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}_convmixer_{args.hdim}_{args.depth}"
                           f"_k{args.ksize}_p{args.psize}")
    state = read_checkpoint(out / "last.pt", "--resume") if args.resume else None
    if state:                              # the run's own recipe; where it runs is this command's
        if state["records"][-1].get("final"):
            raise Fail(f"--resume: the run in {out} has finished all its epochs")
        vars(args).update({k: v for k, v in state["args"].items() if k not in WHERE}, notes=[])
    device, amp = torch.device(args.device), AUTOCAST[args.amp_dtype]
    torch.manual_seed(args.seed)
    images, labels = load_data(args, train=True)
    test = load_data(args, train=False)
    val = (images[len(images) - args.val:], labels[len(labels) - args.val:]) if args.val else None
    model = build_model(model_config(args)).to(device)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if state:                              # weights, BatchNorm statistics, AdamW's moments, loss scale
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:   # as make_optimizer made it: fast/step.py sets its own
            group.update(lr=float(group["lr"]), capturable=False)
        scaler.load_state_dict(state["scaler"])
    step, note = None, None
    if args.fast:                          # the fast step, or why the plain path runs instead
        from fast.step import make_fast_step
        step, note = make_fast_step(model, optimizer, criterion, amp, args, device)
        args.fast = note is None
    start, where = state["epoch"] if state else 0, where_it_runs(device)
    records = state["records"] + [{"resumed": start + 1, **where}] if state else \
        [{"config": recipe(args), "argv": sys.argv, "n_params": n_params(model), **where}]
    step = step or (lambda x, y, lr: train_step(model, optimizer, scaler, criterion, x, y, lr, amp, args.clip))
    data = training_data(args, images[:args.n_train], labels[:args.n_train], device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fail(f"--out {out}: cannot write there ({e.strerror})") from None
    args.out = str(out)
    save_run(out, model, optimizer, scaler, args, records, start)   # --resume has a last.pt from here on
    args.saved, steps = start, args.n_train // args.batch_size
    print(f"ConvMixer-{args.hdim}/{args.depth} k{args.ksize} p{args.psize}: {n_params(model):,} parameters; "
          f"{args.n_train:,} training images, {steps} steps/epoch, {args.epochs} epochs on {where['device']}"
          f"{' (fast path)' * args.fast}, {args.amp_dtype}{' with loss scaling' * scaler.is_enabled()}; "
          f"writing to {out}; commit {where['commit']}", *args.notes, *[note] * bool(note), sep="\n", flush=True)
    started, total = time.time(), args.epochs * steps
    for epoch in range(start, args.epochs):
        t0 = last_line = time.time()
        loss_sum = correct = torch.zeros((), dtype=torch.float64, device=device)
        for i, (x, targets) in enumerate(epoch_batches(args, data, epoch, device)):
            done = epoch * steps + i + 1
            loss, right = step(x, targets, one_cycle_lr(done / total, args.lr))
            loss_sum, correct = loss_sum + loss * len(x), correct + right
            if STOPS:                      # a stop whose KeyboardInterrupt was swallowed (in a fork, say)
                raise KeyboardInterrupt
            if time.time() - last_line >= PROGRESS_SECONDS:
                last_line, rate = time.time(), (done - start * steps) / (time.time() - started)
                print(f"  epoch {epoch + 1} step {i + 1}/{steps}  loss {loss.item():.3f}  "
                      f"{rate * args.batch_size:,.0f} img/s  ETA {hms((total - done) / rate)}", flush=True)
        seen, took = steps * args.batch_size, time.time() - t0
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": 100 * correct.item() / seen,
                  "lr": one_cycle_lr((epoch + 1) / args.epochs, args.lr), "epoch_seconds": took,
                  "images_per_second": seen / took}
        if not math.isfinite(record["train_loss"]):      # then the weights are lost too: stop unsaved
            raise Fail(f"the loss became nan or inf in epoch {epoch + 1}")
        if epoch + 1 == args.epochs or args.eval_every and (epoch + 1) % args.eval_every == 0:
            record.update(accuracies(model, test, val, device, amp))     # for the curve
        records.append(record)
        save_run(out, model, optimizer, scaler, args, records, epoch + 1)
        args.saved = epoch + 1
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {record['train_loss']:.4f}  "
              f"train {record['train_acc']:5.2f}%  "
              + "".join(f"{k[:-4]} {record[k]:5.2f}%  " for k in ("test_acc", "val_acc") if k in record)
              + f"lr {record['lr']:.5f}  {took:.1f} s  {record['images_per_second']:,.0f} img/s", flush=True)
    # The result is the model after the last epoch, not the best epoch's.
    final = {"final": True, **accuracies(model, test, val, device, amp, flip_tta=True),
             "train_seconds": sum(r.get("epoch_seconds", 0) for r in records)}
    save_atomic({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": model_config(args)},
                out / "model.pt")
    save_run(out, model, optimizer, scaler, args, records + [final], args.epochs)
    print(f"final test accuracy {final['test_acc']:.2f}% (flip-TTA {final['test_acc_flip_tta']:.2f}%) after "
          f"{args.epochs} epochs, {hms(final['train_seconds'])} of training; model: {out / 'model.pt'}")
    return final


def recipe(args):
    """The run's settings, as last.pt and the log keep them."""
    return {k: v for k, v in vars(args).items() if k not in ("notes", "saved")}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def save_run(out, model, optimizer, scaler, args, records, epoch):
    """last.pt (the run after `epoch` epochs: weights, optimizer, loss scale, records), then log.jsonl."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "records": records, "args": recipe(args)}, out / "last.pt")
    save_atomic("".join(json.dumps(r) + "\n" for r in records), out / "log.jsonl")


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict(model, images, device, amp, mirror=False):
    """Logits (N, classes), float32 on the CPU, of uint8 images (N, 3, H, W), mirrored left to right
    with mirror; the model is in eval mode meanwhile, then back in its mode. On a CPU, batches of 20:
    larger ones were slower on 2 cores (results/README.md)."""
    was_training, batch_size = model.training, 1000 if device.type == "cuda" else 20
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))
    model.eval()
    try:
        logits = []
        for start in range(0, len(images), batch_size):
            x = (images[start:start + batch_size].to(device).float() / 255 - mean) / std
            with torch.autocast(device.type, amp, enabled=amp is not None):
                logits.append(model(x.flip(3) if mirror else x).float().cpu())     # 3: the width
        return torch.cat(logits)
    finally:
        model.train(was_training)


def evaluate(model, images, labels, device, amp, flip_tta=False):
    """[accuracy (%)]; with flip_tta [accuracy, flip-TTA accuracy], which adds each mirror's logits."""
    logits = [predict(model, images, device, amp)]
    if flip_tta:
        logits.append(logits[0] + predict(model, images, device, amp, mirror=True))
    return [100.0 * (each.argmax(1) == labels).sum().item() / len(labels) for each in logits]


def accuracies(model, test, val, device, amp, flip_tta=False):
    result = dict(zip(["test_acc", "test_acc_flip_tta"], evaluate(model, *test, device, amp, flip_tta)))
    if val:
        result["val_acc"] = evaluate(model, *val, device, amp)[0]
    return result


def evaluate_checkpoint(args):
    ckpt = read_checkpoint(args.eval, "--eval")
    try:
        model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        if [ckpt["config"].get("mean"), ckpt["config"].get("std")] != [list(MEAN), list(STD)]:
            raise ValueError("trained with another normalization than CIFAR-10's")
    except Exception as e:
        raise Fail(f"--eval {args.eval}: not a CIFAR-10 ConvMixer of this script "
                   f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    device = torch.device(args.device)
    images, labels = load_data(args, train=False)
    print(f"evaluating {args.eval}: {len(images):,} test images and their mirrors on {device}", flush=True)
    acc, tta = evaluate(model.to(device), images, labels, device, AUTOCAST[args.amp_dtype], flip_tta=True)
    print(f"test accuracy {acc:.2f}% (flip-TTA {tta:.2f}%) on {len(images):,} images: {args.eval}")
    return acc


STOPS = []                                # the stop signals received


def stop(signum, frame):
    """Ctrl-C (SIGINT) and SIGTERM stop the run at once, wherever it is."""
    STOPS.append(signum)
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    args.saved, STOPS[:] = None, []
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return evaluate_checkpoint(args) if args.eval else train(args)
    except Fail as e:
        kept = f"; {args.out}/last.pt holds epoch {args.saved}" if args.saved else ""
        sys.exit(f"train_cifar.py: error: {e}{kept}")
    except KeyboardInterrupt:
        signum = STOPS[0] if STOPS else signal.SIGINT
        where = "nothing was saved" if args.saved is None else (f"{args.out}/last.pt holds epoch {args.saved}; "
                                                                f"continue with: python train_cifar.py --resume --out {args.out}")
        print(f"\n{signal.Signals(signum).name}: stopped; {where}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
