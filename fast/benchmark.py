"""Training throughput of train_cifar.py's two paths, at the paper's batch size and a large one, on
synthetic data; everything into one benchmark.json.

    python fast/benchmark.py --hdim 256 --depth 8 --ksize 9 --out runs/benchmark     # batch 64 and 512
    python fast/benchmark.py --hdim 256 --depth 8 --ksize 9 --batch-sizes 512 --paths plain

Paths: "plain" (--no-fast: per-image CPU augmentation in worker processes, PyTorch's depthwise
convolution, train_cifar.train_step) and "fast" (--fast: batch augmentation on the device and, on
CUDA, the Triton depthwise kernels in fast/step.py's CUDA graph); --compile runs the model through
torch.compile on both (the trainer has no such flag: this measures whether it would pay). For each
batch size and path: images per second for the whole step (data, MixUp/CutMix, erasing, forward,
backward, clipping, AdamW) and for the model alone; the fast path's augmentation alone; a
torch.profiler table of the kernels (on a CPU, the operators) that take the most time, how many
kernels a step launches, and the GPU-busy fraction of a step; the 200-epoch recipe's training time
at that speed; on CUDA, one depthwise layer per algorithm. benchmark.json is written after each
path, so a run cut short keeps what it measured.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_cifar  # noqa: E402
from fast.augment import AUGMENT_CHUNK_IMAGES  # noqa: E402
from housekeeping import save_atomic, where_it_runs  # noqa: E402

PATHS = {"plain": ["--no-fast"], "fast": ["--fast"]}      # each path's flag, whatever the default


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def depthwise_breakdown(args, device, amp, repeats=20):
    """Milliseconds for one depthwise layer of this config, nn.Conv2d vs each Triton algorithm
    ("toeplitz" with stacks of 32 rows, the default fast_depthwise.TOEPLITZ_ROWS, and 256):
    forward, and forward + backward (input and weight gradients)."""
    from fast import depthwise as fast_depthwise
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
            with torch.autocast(device.type, amp, enabled=amp is not None):
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
    (on a CPU: operators, nested ones included) by their own time, their sum, how many were launched,
    and the busy fraction of the step's wall time."""
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
    busy, wall_ms = sum(ms for _, ms in rows), 1000 * wall / n
    # Launches cost about the same at any batch size, so at batch 64 their number matters.
    launches = sum(e.count for e in prof.key_averages() if e.device_type == kind) / n
    what = "kernels" if device.type == "cuda" else "operators"
    print(f"{label}, profile of {n} steps: {busy:.2f} ms busy of {wall_ms:.2f} ms per step, "
          f"{launches:.0f} {what} run per step (profiler on); top {what}:")
    for name, ms in rows[:top]:
        print(f"    {ms:8.3f} ms  {100 * ms / max(busy, 1e-9):5.1f}%  {name[:100]}")
    return {"steps": n, "wall_ms_per_step": wall_ms, "busy_ms_per_step": busy,
            "busy_fraction": busy / max(wall_ms, 1e-9), "launches_per_step": launches,
            "top": [{"name": name[:200], "ms_per_step": ms} for name, ms in rows[:top]]}


def amp_dtype(args):
    """The autocast precision the trainer takes on this device by default ("float32": none)."""
    return recipe_for(args, args.batch_sizes[0], "plain").amp_dtype


def recipe_for(args, batch_size, path, n_images=50_000):
    """train_cifar's recipe for this config, batch size and path, as its flags would give it."""
    argv = ["--hdim", args.hdim, "--depth", args.depth, "--ksize", args.ksize, "--psize", args.psize,
            "--batch-size", batch_size, "--device", args.device, "--workers", args.workers,
            "--seed", args.seed, "--fake-data", n_images, *PATHS[path]]
    return train_cifar.parse_args([str(a) for a in argv])

WARMUP_STEPS = 10      # before each timing: compiling, capturing a graph, the allocator's first steps


def profiled_steps(args, batch_size):
    """As many steps as --fast augments at a time (16 at batch 512), so that the profile sees one
    augmentation call; at most --steps."""
    return min(args.steps, max(1, AUGMENT_CHUNK_IMAGES // batch_size))


def measure_path(args, path, recipe, device, images, labels):
    """Whole-step and model-only images per second, and a profile, of one path at one batch size."""
    b, warmup = recipe.batch_size, WARMUP_STEPS
    model = train_cifar.build_model(train_cifar.model_config(recipe)).to(device)
    net = torch.compile(model) if args.compile else model
    optimizer = train_cifar.make_optimizer(model, recipe)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp_dtype == "float16")
    amp = train_cifar.AUTOCAST[recipe.amp_dtype]       # as the trainer chooses it for this device
    step = None
    if recipe.fast:
        from fast.step import make_fast_step
        step, note = make_fast_step(net, optimizer, criterion, amp, recipe, device)
        assert note is None, note
    step = step or (lambda x, y, lr: train_cifar.train_step(net, optimizer, scaler, criterion, x, y, lr, amp,
                                                            recipe.clip))
    data = train_cifar.training_data(recipe, images, labels, device)
    batches = train_cifar.epoch_batches(recipe, data, 0, device)

    def whole_steps(step_range):                   # data, mixing, erasing, forward, backward, AdamW
        for _ in step_range:
            step(*next(batches), recipe.lr)

    fixed_x, fixed_y = next(train_cifar.epoch_batches(recipe, data, 0, device))

    def model_steps(step_range):                   # the same batch again and again
        for _ in step_range:
            step(fixed_x, fixed_y, recipe.lr)

    def images_per_second(run_steps):
        run_steps(range(warmup))
        synchronize(device)
        t = time.perf_counter()
        run_steps(range(args.steps))
        synchronize(device)
        return args.steps * b / (time.perf_counter() - t)

    result = {"img_s": images_per_second(whole_steps)}
    result["profile"] = profile_steps(whole_steps, range(profiled_steps(args, b)), device,
                                      f"batch {b}, {path}")
    result["model_only_img_s"] = images_per_second(model_steps)
    if recipe.fast:                    # the data path alone, as training runs it
        def augment_epoch():
            for _ in train_cifar.epoch_batches(recipe, data, 0, device):
                pass
        augment_epoch()
        synchronize(device)
        t = time.perf_counter()
        augment_epoch()
        synchronize(device)
        result["augment_only_img_s"] = recipe.n_train // b * b / (time.perf_counter() - t)
    # The 200-epoch recipe trains on 200 x 50,000 images: its training time at this speed.
    result["recipe_training_seconds"] = 200 * 50_000 / result["img_s"]
    return result


def benchmark(args):
    device = torch.device(args.device)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}_benchmark")
    out.mkdir(parents=True, exist_ok=True)
    result = {**where_it_runs(device),
              "config": {"hdim": args.hdim, "depth": args.depth, "ksize": args.ksize, "psize": args.psize,
                         "amp_dtype": amp_dtype(args), "compile": args.compile, "workers": args.workers,
                         "steps": args.steps}}
    for b in args.batch_sizes:
        n_images = b * (WARMUP_STEPS + 2 * args.steps + profiled_steps(args, b) + 1)
        g = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, train_cifar.N_CLASSES, (n_images,), generator=g)
        section = result.setdefault(f"batch_{b}", {})
        for path in args.paths:
            recipe = recipe_for(args, b, path, n_images)
            section[path] = measure_path(args, path, recipe, device, images, labels)
            m = section[path]
            print(f"batch {b:4d} {path:11s}: {m['img_s']:9,.0f} img/s whole step, "
                  f"{m['model_only_img_s']:9,.0f} model only; the 200-epoch recipe's training in "
                  f"{m['recipe_training_seconds'] / 60:.1f} min", flush=True)
            if "plain" in section:
                m["speedup_over_plain"] = m["img_s"] / section["plain"]["img_s"]
            save_atomic(json.dumps(result, indent=2) + "\n", out / "benchmark.json")
        if device.type == "cuda":
            args.batch_size = b
            section["depthwise_ms"] = depthwise_breakdown(args, device, train_cifar.AUTOCAST[amp_dtype(args)])
            save_atomic(json.dumps(result, indent=2) + "\n", out / "benchmark.json")
    print(f"wrote {out / 'benchmark.json'}")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hdim", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--ksize", type=int, default=9)
    p.add_argument("--psize", type=int, default=1)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on every path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the plain path's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for benchmark.json (default: a new one under runs/)")
    args = p.parse_args(argv)
    if args.steps < 1 or min(args.batch_sizes) < 1:
        p.error("--steps and --batch-sizes must be positive")
    return args


if __name__ == "__main__":
    benchmark(parse_args())
