"""Mutation testing of the training recipe and the fast path: does the test suite notice a small,
realistic bug?

    python tools/mutants.py                  # every mutant, against the whole suite's tests
    python tools/mutants.py --quick          # against the quick check's tests alone (pytest -q)
    python tools/mutants.py --list           # their names and what each one breaks
    python tools/mutants.py lr_per_epoch flip_tta_vertical

Each mutant is one small edit of the project's code (a bug someone could plausibly write). For
each, the project's tracked files are copied to a temporary folder, the edit is made there, and
the tests that should notice it are run against the copy: "killed" if they fail, "SURVIVED" if
they pass. First the same tests run on the unchanged copy, which must pass, so that a kill means
the edit was noticed and not that the tests were broken already. Exits 1 if any mutant survives.
With --quick, each mutant meets only those of its tests that `pytest -q` runs (not marked slow):
every mutant of the recipe and of fast/augment.py must be killed there too, so that the quick check
alone catches a recipe bug; a mutant whose tests are all slow is reported as such ("slow only").
The real CIFAR-10 is used when CIFAR10_ROOT (or ./data) holds it, as in the test suite.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    what: str            # the bug, in words
    file: str
    old: str             # must occur exactly once in `file`
    new: str
    tests: str           # pytest -k expression: the tests that should notice


AUGMENT_TESTS = "batch_augment_equals or samples_the_same_distribution or batched_ops"
DEPTHWISE_TESTS = "matches_conv2d_float32 or toeplitz_stacks or check_against_conv2d"
RESUME_TESTS = "kill_inside_a_write and unrenamed-3"

MUTANTS = [
    # The trainer (train_cifar.py)
    Mutant("flip_tta_vertical", "flip-TTA flips the image upside down", "train_cifar.py",
           "x.flip(3) if mirror", "x.flip(2) if mirror", "flip_tta"),
    Mutant("flip_tta_mirror_only", "flip-TTA scores the mirrored images alone", "train_cifar.py",
           "logits.append(logits[0] + predict(", "logits.append(0 * logits[0] + predict(", "flip_tta"),
    Mutant("lr_per_epoch", "the learning rate is stepped once per epoch, not every step", "train_cifar.py",
           "done = epoch * steps + i + 1", "done = epoch * steps + steps", "learning_rate"),
    Mutant("lr_not_applied", "the scheduled learning rate never reaches the optimizer", "train_cifar.py",
           '        group["lr"] = lr\n', "        pass\n", "learning_rate or graph_steps_body"),
    Mutant("schedule_peak_late", "the one-cycle peak at 1/2 of training instead of 2/5", "train_cifar.py",
           "(0.4, peak)", "(0.5, peak)", "one_cycle or learning_rate"),
    Mutant("no_label_smoothing", "label smoothing removed", "train_cifar.py",
           "nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)", "nn.CrossEntropyLoss()", "label_smoothed"),
    Mutant("decay_everything", "weight decay on biases and BatchNorm too", "train_cifar.py",
           '{"params": no_decay, "weight_decay": 0.0}', '{"params": no_decay, "weight_decay": args.wd}',
           "weight_decay"),
    Mutant("adamw_eps_default", "AdamW's epsilon left at PyTorch's default", "train_cifar.py",
           "lr=args.lr, eps=args.eps,", "lr=args.lr,", "weight_decay"),
    Mutant("no_clipping", "gradient clipping removed", "train_cifar.py",
           "    if clip > 0:\n", "    if False:\n", "clipping"),
    Mutant("clip_not_passed", "the trainer never passes --clip to the step", "train_cifar.py",
           "x, y, lr, amp, args.clip))", "x, y, lr, amp, 0.0))", "learning_rate"),
    Mutant("val_from_the_front", "--val takes the first training images, which are trained on", "train_cifar.py",
           "val = (images[len(images) - args.val:], labels[len(labels) - args.val:])",
           "val = (images[:args.val], labels[:args.val])", "val_holds_out"),
    Mutant("resume_without_batchnorm_stats", "resume restores the weights but not BatchNorm's statistics",
           "train_cifar.py", '        model.load_state_dict(state["model"])',
           '        model.load_state_dict({k: v for k, v in state["model"].items() if "running" not in k}, '
           'strict=False)', RESUME_TESTS),
    Mutant("resume_without_adamw_state", "resume starts AdamW's moments afresh", "train_cifar.py",
           '        optimizer.load_state_dict(state["optimizer"])', "        pass", RESUME_TESTS),
    Mutant("resume_replays_the_wrong_epoch", "resume starts at the epoch after the one last.pt holds",
           "train_cifar.py", 'start, where = state["epoch"] if state', 'start, where = state["epoch"] + 1 if state',
           RESUME_TESTS),
    Mutant("no_mixing", "MixUp and CutMix never applied", "train_cifar.py",
           "if alpha > 0]", "if alpha > 1e9]", "mixup_and_cutmix"),
    Mutant("mix_alpha_one", "MixUp/CutMix alpha fixed at 1", "train_cifar.py",
           "mixer(alpha=alpha, num_classes=N_CLASSES)", "mixer(alpha=1.0, num_classes=N_CLASSES)",
           "mixup_and_cutmix"),
    Mutant("always_mixup", "MixUp every batch, never CutMix", "train_cifar.py",
           "    return v2.RandomChoice(mixers)", "    return mixers[0]", "chooses_mixup"),
    Mutant("no_shuffle", "the images in the same order every epoch", "train_cifar.py",
           "order = torch.randperm(args.n_train, generator=g)", "order = torch.arange(args.n_train)",
           "random_choice"),
    Mutant("eval_in_train_mode", "evaluation with BatchNorm in training mode", "train_cifar.py",
           "    model.eval()\n", "    pass\n", "eval_mode"),
    Mutant("eval_leaves_eval_mode", "evaluation leaves the model in eval mode", "train_cifar.py",
           "        model.train(was_training)", "        pass", "eval_mode"),
    Mutant("eval_leaves_train_mode", "evaluation leaves the model training, whatever the caller's mode",
           "train_cifar.py", "        model.train(was_training)", "        model.train()", "eval_mode"),
    Mutant("batch_128", "the default batch size 128, not the paper's 64", "train_cifar.py",
           'add("--batch-size", type=POSITIVE, default=64)', 'add("--batch-size", type=POSITIVE, default=128)',
           "defaults_are"),
    Mutant("cpu_no_flip", "the per-image path never flips", "train_cifar.py",
           "                       v2.RandomHorizontalFlip(),\n", "", "cpu_transform_crops"),
    Mutant("cpu_crop_scale", "the per-image crop scale 0.5-1", "train_cifar.py",
           "v2.RandomResizedCrop(32, scale=(args.scale, 1.0)", "v2.RandomResizedCrop(32, scale=(0.5, 1.0)",
           "cpu_transform_crops"),
    Mutant("erasing_fixed", "erasing at p 0.5, whatever --reprob says", "train_cifar.py",
           'v2.RandomErasing(p=p, value="random")', 'v2.RandomErasing(p=0.5, value="random")', "erasing_comes"),
    Mutant("erasing_before_mixing", "the boxes erased before MixUp/CutMix, then blended", "train_cifar.py",
           "        images, targets = mix(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))\n"
           "        yield erase(images, args.reprob), targets",
           "        images, targets = mix(erase(images.to(device), args.reprob), labels.to(device))\n"
           "        yield images, targets", "erasing_comes"),
    Mutant("same_mix_every_step", "one MixUp/CutMix draw for every step of an epoch", "train_cifar.py",
           "        torch.manual_seed(seed)                          #", "        torch.manual_seed(0)  #",
           "random_choice"),
    Mutant("same_draws_every_epoch", "each image augmented alike in every epoch", "train_cifar.py",
           "image_seeds = torch.randint(2**62, (args.n_train,), generator=g)",
           "image_seeds = torch.randint(2**62, (args.n_train,), generator=torch.Generator().manual_seed(args.seed))",
           "random_choice"),
    Mutant("same_seed_every_image", "every image of a batch augmented alike", "train_cifar.py",
           "pairs = list(zip(order.tolist(), image_seeds.tolist()))",
           "pairs = [(i, 0) for i in order.tolist()]", "random_choice"),
    Mutant("recipe_overrides_given_flags", "--recipe short overwrites the flags given with it", "train_cifar.py",
           "    args = p.parse_args(argv)\n    unset", "    vars(args).update(RECIPES[args.recipe])\n    unset",
           "short_recipe"),
    Mutant("bfloat16_on_old_gpus", "bfloat16 autocast on GPUs without native bfloat16 (T4, V100)",
           "housekeeping.py", 'else "bfloat16" if capability >= (8, 0) else "float16"', 'else "bfloat16"',
           "chosen_by_the_hardware"),
    Mutant("fast_on_every_gpu", "--fast by default on GPUs it was never measured on", "housekeeping.py",
           "args.fast = capability == (9, 0) and", "args.fast = capability is not None and",
           "chosen_by_the_hardware"),
    Mutant("clip_scaled_gradients", "float16: the gradients clipped while still scaled by the loss scale",
           "train_cifar.py", "        scaler.unscale_(optimizer)                 # clip the true gradients\n", "",
           "overflow"),
    Mutant("note_ignored", "a GPU whose kernels fail their check still takes the fast path", "train_cifar.py",
           "        args.fast = note is None\n", "", "disagree"),
    Mutant("nan_not_stopped", "a non-finite loss is saved as an epoch like any other", "train_cifar.py",
           'if not math.isfinite(record["train_loss"]):', "if False:", "non_finite"),
    Mutant("write_not_atomic", "last.pt and the log written in place, not through a renamed .tmp",
           "housekeeping.py", "        os.replace(tmp, path)\n", "        os.replace(tmp, path)\n"
           "        path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])\n", RESUME_TESTS),
    # The batch augmentation (fast/augment.py)
    Mutant("same_draws_every_chunk", "--fast augments every chunk of an epoch with the same draws",
           "fast/augment.py", "generator.manual_seed(int(image_seeds[start * b]))",
           "generator.manual_seed(int(image_seeds[0]))", "random_choice"),
    Mutant("wrong_op", "every image gets the next op of the table, not the one it drew",
           "fast/augment.py", "out[index] = BATCHED_OPS[spec.name](images[index], a, self.fill)",
           "out[index] = BATCHED_OPS[self.ops[(g + 1) % skip].name](images[index], a, self.fill)",
           AUGMENT_TESTS),
    Mutant("vertical_flip", "a vertical instead of a horizontal flip", "fast/augment.py",
           "x.flip(-1), x)", "x.flip(-2), x)", AUGMENT_TESTS),
    Mutant("no_randaugment", "RandAugment dropped", "fast/augment.py",
           "        for k in range(self.ra_n):\n            x = self.randaugment(",
           "        for k in range(0):\n            x = self.randaugment(", AUGMENT_TESTS),
    Mutant("crop_scale_0_3", "crop scale 0.3-1 instead of 0.75-1", "fast/augment.py",
           "self.scale, self.reprob = ops, size, (scale, 1.0), reprob",
           "self.scale, self.reprob = ops, size, (0.3, 1.0), reprob", AUGMENT_TESTS),
    Mutant("erasing_0_2", "erasing probability 0.2 instead of 0.25", "fast/augment.py",
           "generator=generator, device=device) < self.reprob", "generator=generator, device=device) < 0.2",
           AUGMENT_TESTS),
    Mutant("ops_always_applied", "every drawn op applied (p 1 instead of 0.5)", "fast/augment.py",
           'params[f"apply{k}"] = rand() < self.ra_p', 'params[f"apply{k}"] = rand() < 1.0', AUGMENT_TESTS),
    Mutant("no_magnitude_noise", "no noise on the magnitude", "fast/augment.py",
           "(self.ra_m + self.ra_mstd * noise)", "(self.ra_m + 0.0 * noise)", AUGMENT_TESTS),
    Mutant("never_negative", "signed ops never negated", "fast/augment.py",
           "a = torch.where(negative[index], -a, a)", "a = a", AUGMENT_TESTS),
    Mutant("bilinear_only", "crops always bilinear", "fast/augment.py",
           "bicubic=rand() < 0.5", "bicubic=rand() < 0.0", AUGMENT_TESTS),
    # The graph step's body (fast/step.py); the graph itself needs a GPU
    Mutant("graph_no_clipping", "the graph step never clips the gradient", "fast/step.py",
           "        if self.clip > 0:\n", "        if False:\n", "graph_steps_body"),
    Mutant("graph_correct_of_logits", "the graph step counts the top class against the wrong axis",
           "fast/step.py", "(logits.argmax(1) == targets.argmax(1)).sum()",
           "(logits.argmax(0)[:1] == targets.argmax(1)).sum()", "graph_steps_body"),
    # The Triton depthwise convolution (fast/depthwise.py), in Triton's interpreter on a CPU
    Mutant("dw_grad_input_unflipped", "the input gradient correlates dy with the kernel not turned by 180 degrees",
           "fast/depthwise.py", "weight.flip(-1, -2), None, k - 1 - pad_top", "weight, None, k - 1 - pad_top",
           DEPTHWISE_TESTS),
    Mutant("dw_grad_input_same_pads", "the input gradient pads as the forward does (wrong for even k)",
           "fast/depthwise.py", "None, k - 1 - pad_top, k - 1 - pad_left,", "None, pad_top, pad_left,",
           DEPTHWISE_TESTS),
    Mutant("dw_even_k_pad_before", "for even k, the extra row and column of padding before the image",
           "fast/depthwise.py", "self.pad = (k - 1) // 2", "self.pad = k // 2", DEPTHWISE_TESTS),
    Mutant("dw_direct_past_the_row", "\"direct\" reads past a row's end into the next row",
           "fast/depthwise.py", "mask=row_ok & (s >= 0) & (s < W), other=0.0)",
           "mask=row_ok & (s >= 0), other=0.0)", DEPTHWISE_TESTS),
    Mutant("dw_direct_grad_drops_image", '"direct" leaves the last image of each chunk out of the weight gradient',
           "fast/depthwise.py", "for b in range(first, last):", "for b in range(first, last - 1):",
           DEPTHWISE_TESTS),
    Mutant("dw_toeplitz_band_mirrored", '"toeplitz" builds its banded matrices with each kernel row mirrored',
           "fast/depthwise.py", "d = j[:, None] - j[None, :] + pad_left", "d = j[None, :] - j[:, None] + pad_left",
           DEPTHWISE_TESTS),
    Mutant("dw_toeplitz_grad_diagonal", '"toeplitz" sums the weight gradient along the mirrored diagonals',
           "fast/depthwise.py", "diagonal = cols + src - PAD_L", "diagonal = cols - src + PAD_L", DEPTHWISE_TESTS),
    Mutant("dw_toeplitz_next_plane", "\"toeplitz\" reads below a plane's last row into the next plane",
           "fast/depthwise.py", "(r < H) & (cols < W),\n                    other=0.0)\n        t = tl.load",
           "(cols < W),\n                    other=0.0)\n        t = tl.load", DEPTHWISE_TESTS),
    Mutant("dw_toeplitz_wide_kernels", '"toeplitz" taken for kernels wider than its tile (the old bug)',
           "fast/depthwise.py", "fits = width <= TOEPLITZ_MAX_WIDTH and k <= _blocks(1, width, \"toeplitz\")[1]",
           "fits = width <= TOEPLITZ_MAX_WIDTH", DEPTHWISE_TESTS),
    Mutant("dw_no_device_guard", "the kernels launch on the current GPU, not their input's", "fast/depthwise.py",
           'return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()',
           "return contextlib.nullcontext()", "launch_on_their_inputs_device"),
    # The per-image RandAugment (randaugment.py), the reference both paths follow
    Mutant("ra_rotate_scale", "rotation on torchvision's 0-30 scale (9 degrees at m 9)", "randaugment.py",
           "lambda m: 30 * m / 10,", "lambda m: 10 * m / 10,", "randaugment_ops_are_timms"),
    Mutant("ra_posterize_bits", "posterize keeps 4 bits at m 9", "randaugment.py",
           "lambda m: 4 - torch.floor(4 * m / 10)", "lambda m: 8 - torch.floor(4 * m / 10)",
           "randaugment_ops_are_timms"),
    Mutant("ra_p_ignored", "every drawn op applied on the CPU path", "randaugment.py",
           "            if torch.rand(()) >= self.p:\n", "            if False:\n", "draws_as_timm"),
    Mutant("ra_no_noise", "no magnitude noise on the CPU path", "randaugment.py",
           "(self.magnitude + self.magnitude_std * torch.randn(()))", "(self.magnitude + 0 * torch.randn(()))",
           "draws_as_timm"),
]


def copy_project(destination):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def run_tests(folder, expression, quick=False):
    """pytest's exit code and summary line for the tests that `expression` selects: of the whole
    suite (-m ""), or with quick of the quick check's (pytest.ini's default, not slow)."""
    env = dict(os.environ)
    if "CIFAR10_ROOT" not in env and (ROOT / "data" / "cifar-10-batches-py").is_dir():
        env["CIFAR10_ROOT"] = str(ROOT / "data")
    marks = [] if quick else ["-m", ""]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *marks,
                           "-k", expression], cwd=folder, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return proc.returncode, summary


NO_TESTS = 5                     # pytest's exit code when every test is deselected
# The mutants the quick check must kill by itself: the recipe's and the batch augmentation's, but
# those that only a whole run can show (a resume; the fused norm, whose tests train).
QUICK_FILES = {"train_cifar.py", "housekeeping.py", "randaugment.py", "fast/augment.py"}
WHOLE_RUN_ONLY = {"resume_without_batchnorm_stats", "resume_without_adamw_state", "resume_replays_the_wrong_epoch",
                  "write_not_atomic", "val_from_the_front", "nan_not_stopped"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--quick", action="store_true", help="run each mutant against the quick check's tests only")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutant(s): {', '.join(sorted(unknown))} (see --list)")
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.what}  [{m.file}; tests: {m.tests}]")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        copy_project(clean)
        union = " or ".join(f"({m.tests})" for m in chosen)
        code, summary = run_tests(clean, union, args.quick)
        print(f"unchanged code{' (quick check)' * args.quick}: {summary}", flush=True)
        if code != 0:
            print("the selected tests fail on the unchanged code; fix that first")
            return 2
        survived, slow_only_names = [], set()
        for m in chosen:
            folder = Path(tmp) / m.name
            copy_project(folder)
            source = (folder / m.file).read_text()
            if source.count(m.old) != 1:
                print(f"{m.name}: its text occurs {source.count(m.old)} times in {m.file}, not once; "
                      f"update the mutant")
                return 2
            (folder / m.file).write_text(source.replace(m.old, m.new))
            start = time.time()
            code, summary = run_tests(folder, m.tests, args.quick)
            slow_only = args.quick and code == NO_TESTS
            verdict = "killed" if code == 1 else "SURVIVED" if code == 0 else "slow only" if slow_only \
                else f"error (pytest exit {code})"
            print(f"{m.name:32s} {verdict:9s} {time.time() - start:5.0f} s  {m.what}  [{summary}]", flush=True)
            if slow_only and (m.file not in QUICK_FILES or m.name in WHOLE_RUN_ONLY):
                slow_only_names.add(m.name)
            elif code != 1:
                survived.append(m.name)
            shutil.rmtree(folder)
    slow_only = [m.name for m in chosen if m.name in slow_only_names]
    print(f"{len(chosen) - len(survived) - len(slow_only)} of {len(chosen)} mutants killed"
          + (f" by the quick check; seen by slow tests only: {', '.join(slow_only)}" if slow_only else "")
          + (f"; not killed: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
