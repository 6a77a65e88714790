"""Mutation testing of the training recipe and the fast path: does the test suite notice a small,
realistic bug?

    python tools/mutants.py                  # every mutant; about 15 minutes on 2 CPU cores
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


TRAINER_TESTS = "learning_rate or one_cycle or clipping or weight_decay or label_smoothed or val_is"
AUGMENT_TESTS = "batch_augment_equals or samples_the_same_distribution or batched_ops"
STEP_TESTS = "device_step_equals_the_host_step or device_step_resumes_exactly"
DEPTHWISE_TESTS = "matches_conv2d_float32 or toeplitz_stacks"
NORM_TESTS = ("fused_gelu_batchnorm and (matches_gelu_then or in_half or in_a_convmixer or several_blocks"
              " or adds_the_skip)")

MUTANTS = [
    # The trainer (train_cifar.py)
    Mutant("flip_tta_vertical", "flip-TTA flips the image upside down", "train_cifar.py",
           "x = x.flip(3)", "x = x.flip(2)", "flip_tta"),
    Mutant("flip_tta_mirror_only", "flip-TTA scores the mirrored images alone", "train_cifar.py",
           "logits.append(logits[0] + predict(", "logits.append(0 * logits[0] + predict(", "flip_tta"),
    Mutant("lr_per_epoch", "the learning rate is stepped once per epoch, not every step",
           "train_cifar.py", "(self.epoch * plan.steps + self.step + 1)",
           "(self.epoch * plan.steps + plan.steps)", "learning_rate"),
    Mutant("lr_not_applied", "the scheduled learning rate never reaches the optimizer", "train_cifar.py",
           '        group["lr"] = lr\n', "        pass\n", "learning_rate"),
    Mutant("schedule_peak_late", "the one-cycle peak at 1/2 of training instead of 2/5",
           "train_cifar.py", "(0.4, peak)", "(0.5, peak)", "one_cycle or learning_rate"),
    Mutant("no_label_smoothing", "label smoothing removed", "train_cifar.py",
           "nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)", "nn.CrossEntropyLoss()",
           "label_smoothed"),
    Mutant("decay_everything", "weight decay on biases and BatchNorm too", "train_cifar.py",
           '{"params": no_decay, "weight_decay": 0.0}', '{"params": no_decay, "weight_decay": recipe.wd}',
           "weight_decay"),
    Mutant("adamw_eps_default", "AdamW's epsilon left at PyTorch's default", "train_cifar.py",
           "lr=recipe.lr, eps=recipe.eps,", "lr=recipe.lr,", "weight_decay"),
    Mutant("no_clipping", "gradient clipping removed", "train_cifar.py",
           "    if clip > 0:\n", "    if False:\n", "clipping"),
    Mutant("clip_not_passed", "the trainer never passes --clip to the step", "train_cifar.py",
           "self.amp,\n                            self.recipe.clip, self.scaler)",
           "self.amp,\n                            0.0, self.scaler)",
           "learning_rate"),
    Mutant("val_from_the_front", "--val takes the first training images, which are trained on",
           "train_cifar.py", "self.val = (images[n - recipe.val:], labels[n - recipe.val:])",
           "self.val = (images[:recipe.val], labels[:recipe.val])", "val_is"),
    Mutant("resume_without_batchnorm_stats", "resume restores the weights but not BatchNorm's statistics",
           "train_cifar.py", 'self.model.load_state_dict(state["state_dict"])',
           'self.model.load_state_dict({k: v for k, v in state["state_dict"].items() '
           'if "running" not in k}, strict=False)', "interrupt_then_resume and plain"),
    Mutant("no_mixing", "MixUp and CutMix never applied", "train_cifar.py",
           "if alpha > 0]", "if alpha > 1e9]", "mixup_and_cutmix"),
    Mutant("mix_alpha_one", "MixUp/CutMix alpha fixed at 1", "train_cifar.py",
           "m(alpha=alpha, num_classes=N_CLASSES)", "m(alpha=1.0, num_classes=N_CLASSES)",
           "mixup_and_cutmix"),
    Mutant("no_shuffle", "the images in the same order every epoch", "train_cifar.py",
           "self.order = torch.randperm(n_images, generator=g).tolist()",
           "self.order = list(range(n_images))", "shuffles"),
    Mutant("eval_in_train_mode", "evaluation with BatchNorm in training mode", "train_cifar.py",
           "    model.eval()\n", "    pass\n", "eval_mode"),
    Mutant("eval_leaves_eval_mode", "training goes on in eval mode after an evaluation", "train_cifar.py",
           "    model.train()\n    return torch.cat(logits)", "    return torch.cat(logits)", "eval_mode"),
    Mutant("always_mixup", "MixUp every batch, never CutMix", "train_cifar.py",
           "    return v2.RandomChoice(mixers)", "    return mixers[0]", "chooses_mixup"),
    Mutant("batch_128", "the default batch size 128, not the paper's 64", "train_cifar.py",
           'add("--batch-size", type=int, default=64)', 'add("--batch-size", type=int, default=128)',
           "defaults_are"),
    Mutant("cpu_no_flip", "the per-image path never flips", "train_cifar.py",
           "        v2.RandomHorizontalFlip(),\n", "", "cpu_transform_crops"),
    Mutant("cpu_crop_scale", "the per-image crop scale 0.5-1", "train_cifar.py",
           "v2.RandomResizedCrop(32, scale=(recipe.scale, 1.0)", "v2.RandomResizedCrop(32, scale=(0.5, 1.0)",
           "cpu_transform_crops"),
    Mutant("cpu_erasing_fixed", "the per-image erasing at p 0.5, whatever --reprob says", "train_cifar.py",
           'v2.RandomErasing(p=recipe.reprob, value="random")', 'v2.RandomErasing(p=0.5, value="random")',
           "cpu_transform_crops"),
    Mutant("same_mix_every_step", "one MixUp/CutMix draw for every step of an epoch", "train_cifar.py",
           "manual_seed(plan.mix_seeds[self.step])", "manual_seed(plan.mix_seeds[0])", "random_choice"),
    Mutant("same_draws_every_epoch", "each image augmented alike in every epoch", "train_cifar.py",
           "self.image_seeds = torch.randint(2**62, (n_images,), generator=g).tolist()",
           "self.image_seeds = torch.randint(2**62, (n_images,), generator=torch.Generator().manual_seed(seed))"
           ".tolist()", "random_choice"),
    Mutant("same_seed_every_image", "every image of a batch augmented alike", "train_cifar.py",
           "(self.order[j], self.image_seeds[j])", "(self.order[j], self.image_seeds[s * b])", "random_choice"),
    # The batch augmentation (fast/augment.py)
    Mutant("same_draws_every_chunk", "--fast augments every chunk of an epoch with the same draws",
           "fast/augment.py", "generator.manual_seed(plan.augment_seeds[start])",
           "generator.manual_seed(plan.augment_seeds[0])", "random_choice"),
    Mutant("wrong_op", "every image gets the next op of the table, not the one it drew",
           "fast/augment.py", "out[index] = BATCHED_OPS[spec.name](images[index], a, self.fill)",
           "out[index] = BATCHED_OPS[self.ops[(g + 1) % skip].name](images[index], a, self.fill)",
           AUGMENT_TESTS),
    Mutant("vertical_flip", "a vertical instead of a horizontal flip", "fast/augment.py",
           "x.flip(-1), x)", "x.flip(-2), x)", AUGMENT_TESTS),
    Mutant("no_randaugment", "RandAugment dropped", "fast/augment.py",
           "        for k in range(self.ra_n):\n            x = self.randaugment(",
           "        for k in range(0):\n            x = self.randaugment(", AUGMENT_TESTS),
    Mutant("one_op", "one RandAugment op per image instead of two", "fast/augment.py",
           "        for k in range(self.ra_n):\n            x = self.randaugment(",
           "        for k in range(1):\n            x = self.randaugment(", AUGMENT_TESTS),
    Mutant("crop_scale_0_3", "crop scale 0.3-1 instead of 0.75-1", "fast/augment.py",
           "self.scale, self.reprob = ops, size, (scale, 1.0), reprob",
           "self.scale, self.reprob = ops, size, (0.3, 1.0), reprob", AUGMENT_TESTS),
    Mutant("erasing_0_2", "erasing probability 0.2 instead of 0.25", "fast/augment.py",
           "generator=generator, device=device) < self.reprob",
           "generator=generator, device=device) < 0.2", AUGMENT_TESTS),
    Mutant("ops_always_applied", "every drawn op applied (p 1 instead of 0.5)", "fast/augment.py",
           'params[f"apply{k}"] = rand() < self.ra_p', 'params[f"apply{k}"] = rand() < 1.0',
           AUGMENT_TESTS),
    Mutant("no_magnitude_noise", "no noise on the magnitude", "fast/augment.py",
           "(self.ra_m + self.ra_mstd * noise)", "(self.ra_m + 0.0 * noise)", AUGMENT_TESTS),
    Mutant("never_negative", "signed ops never negated", "fast/augment.py",
           "a = torch.where(negative[index], -a, a)", "a = a", AUGMENT_TESTS),
    Mutant("bilinear_only", "crops always bilinear", "fast/augment.py",
           "bicubic=rand() < 0.5", "bicubic=rand() < 0.0", AUGMENT_TESTS),
    # The device step of --step-mode device and graph (fast/step.py); its CUDA graph needs a GPU
    Mutant("device_loss_unweighted", "the epoch's loss sum adds each step's mean loss, not loss x images",
           "fast/step.py", "loss.detach().double() * n", "loss.detach().double()", STEP_TESTS),
    Mutant("device_skip_not_sticky", "after a non-finite loss, the next finite step updates the weights again",
           "fast/step.py", "torch.maximum(self.found_inf, (~finite).float())", "(~finite).float()", STEP_TESTS),
    Mutant("device_last_bad_step", "the stop names the last non-finite step, not the first",
           "fast/step.py", "(self.first_bad_step < 0) & ~finite", "~finite", STEP_TESTS),
    Mutant("device_no_clipping", "the device step never clips the gradient", "fast/step.py",
           "        if self.clip > 0:\n", "        if False:\n", STEP_TESTS),
    Mutant("device_resume_drops_sums", "a run resumed mid-epoch restarts the epoch's loss sum at 0",
           "fast/step.py", "self.loss_sum.fill_(loss_sum)", "self.loss_sum.fill_(0.0)", STEP_TESTS),
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
           "fast/depthwise.py", "diagonal = cols + src - PAD_L", "diagonal = cols - src + PAD_L",
           DEPTHWISE_TESTS),
    Mutant("dw_toeplitz_next_plane", "\"toeplitz\" reads below a plane's last row into the next plane",
           "fast/depthwise.py", "(r < H) & (cols < W),\n                    other=0.0)\n        t = tl.load",
           "(cols < W),\n                    other=0.0)\n        t = tl.load", DEPTHWISE_TESTS),
    # GELU -> BatchNorm fused (fast/gelu_batchnorm.py), in Triton's interpreter on a CPU
    Mutant("norm_running_var_biased", "the running variance moves towards the batch's biased variance",
           "fast/gelu_batchnorm.py", "self.momentum, n / (n - 1))", "self.momentum, 1.0)", NORM_TESTS),
    Mutant("norm_planes_only", "a channel's variance leaves out how far each plane's mean is from the channel's",
           "fast/gelu_batchnorm.py", "BLOCK_B) + HW * offset * offset", "BLOCK_B)", NORM_TESTS),
    Mutant("norm_mean_per_block", "the batch's mean divides by the images of a block, not of the batch",
           "fast/gelu_batchnorm.py", "mean = tl.sum(total, axis=0) / B", "mean = tl.sum(total, axis=0) / BLOCK_B",
           NORM_TESTS),
    Mutant("norm_gelu_unrounded", "the statistics of GELU's float32 values, not of its 16-bit output",
           "fast/gelu_batchnorm.py", "return z, g.to(z_plane.dtype.element_ty).to(tl.float32)", "return z, g",
           NORM_TESTS),
    Mutant("norm_batches_uncounted", "num_batches_tracked stays where it was",
           "fast/gelu_batchnorm.py", "tl.load(count_ptr) + 1)", "tl.load(count_ptr))", NORM_TESTS),
    Mutant("norm_grad_no_mean_term", "the input gradient leaves out the batch mean's part",
           "fast/gelu_batchnorm.py", "tl.store(d_ptr + cs, -a * sum_dy / n, mask=ok)",
           "tl.store(d_ptr + cs, 0 * sum_dy, mask=ok)", NORM_TESTS),
    Mutant("norm_gelu_slope_cdf_only", "GELU's slope taken as Phi(z), without z * phi(z)",
           "fast/gelu_batchnorm.py", " + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI", "", NORM_TESTS),
    Mutant("norm_skip_not_added", "the normalize kernel leaves the skip connection out",
           "fast/gelu_batchnorm.py", "y += tl.load(residual_ptr", "y += 0 * tl.load(residual_ptr", NORM_TESTS),
    Mutant("norm_skip_no_gradient", "the skip connection passes no gradient back",
           "fast/gelu_batchnorm.py",
           "grad_residual = None if ctx.residual_dtype is None else dy.to(ctx.residual_dtype)", "grad_residual = None",
           NORM_TESTS),
    # The per-image RandAugment (train_cifar.py), the reference both paths follow
    Mutant("ra_rotate_scale", "rotation on torchvision's 0-30 scale (9 degrees at m 9)", "trainer/randaugment.py",
           "lambda m: 30 * m / 10,", "lambda m: 10 * m / 10,", "randaugment_ops_are_timms"),
    Mutant("ra_posterize_bits", "posterize keeps 4 bits at m 9", "trainer/randaugment.py",
           "lambda m: 4 - torch.floor(4 * m / 10)", "lambda m: 8 - torch.floor(4 * m / 10)",
           "randaugment_ops_are_timms"),
    Mutant("ra_p_ignored", "every drawn op applied on the CPU path", "trainer/randaugment.py",
           "            if torch.rand(()) >= self.p:\n", "            if False:\n", "draws_as_timm"),
    Mutant("ra_no_noise", "no magnitude noise on the CPU path", "trainer/randaugment.py",
           "(self.magnitude + self.magnitude_std * torch.randn(()))", "(self.magnitude + 0 * torch.randn(()))",
           "draws_as_timm"),
    # Which step a run takes on CUDA by default, and which paths the benchmark measures
    Mutant("graph_with_compile", "the default step is a CUDA graph with --compile too (untested there)",
           "train_cifar.py", '"graph" if args.fast and capability and not args.compile else "host"',
           '"graph" if args.fast and capability else "host"', "default_step_is_the_fast"),
    Mutant("recipe_overrides_given_flags", "--recipe short overwrites the flags given with it", "train_cifar.py",
           "        if flag not in args.given:\n", "        if True:\n", "short_recipe"),
    # The precision chosen by the hardware, and float16's loss scaling (train_cifar.py)
    Mutant("bfloat16_on_old_gpus", "bfloat16 autocast on GPUs without native bfloat16 (T4, V100)",
           "train_cifar.py", 'else "bfloat16" if native_bfloat16 else "float16"', 'else "bfloat16"',
           "chosen_by_the_hardware"),
    Mutant("clip_scaled_gradients", "float16: the gradients clipped while still scaled by the loss scale",
           "train_cifar.py", "        scaler.unscale_(optimizer)        # clip the true gradients\n", "",
           "overflow"),
    Mutant("scaler_not_restored", "--resume of a float16 run starts its loss scale afresh", "train_cifar.py",
           '                    self.scaler.load_state_dict(state["scaler"])', "                    pass",
           "float16_run_keeps_its_loss_scale"),
    Mutant("benchmark_plain_takes_defaults", "the benchmark's plain path takes the trainer's defaults, on "
           "CUDA the fast path", "fast/benchmark.py", '"plain": ["--no-fast", "--step-mode", "host"]',
           '"plain": []', "default_step_is_the_fast"),
    Mutant("benchmark_fused_norm_ignored", "the benchmark's --fused-norm measures the unfused paths",
           "fast/benchmark.py", '(["--fused-norm"] if args.fused_norm and path != "plain" else [])', "[]",
           "benchmark_fused_norm"),
    Mutant("fused_norm_ignored", "the trainer's --fused-norm trains the unfused model", "train_cifar.py",
           "    if recipe.fused_norm:      #", "    if False:      #", "fused_norm_trains"),
    Mutant("fused_norm_resumed_anywhere", "a run with --fused-norm continues on a CPU, where its kernels fail",
           "trainer/files.py", 'if recipe.get("fused_norm") and args is not None', "if False", "fused_norm_trains"),
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
QUICK_FILES = {"train_cifar.py", "trainer/randaugment.py", "fast/augment.py"}
WHOLE_RUN_ONLY = {"resume_without_batchnorm_stats", "fused_norm_ignored", "scaler_not_restored"}


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
