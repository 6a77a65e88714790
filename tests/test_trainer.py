"""train_cifar.py run as a user runs it (a tiny ConvMixer on a slice of CIFAR-10, or on FakeData
without it), its flags and errors, and the recipe element by element: each test pins one element
by its effect (tools/mutants.py checks that these tests notice deliberate bugs).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from convmixer import ConvMixer
from helpers import (CIFAR10_MEAN, CIFAR10_STD, DATA, REAL_DATA, ROOT, TINY, as_on_a_gpu, error_lines_of_main,
                     read_log, run_script, sample_images, storage_locations, without_timings)


def test_checkpoints_are_written_from_the_cpu_through_every_container(tmp_path):
    """save_atomic (last.pt, model.pt) saves each tensor from the CPU, found inside dicts, lists and
    tuples as a model's and AdamW's state_dicts hold them, and leaves everything else as it is; so
    a file written on a GPU loads with a plain torch.load on any machine (the GPU test of the step
    modes checks files written from CUDA)."""
    from trainer.files import on_cpu, save_atomic
    weight = torch.randn(3, 2, requires_grad=True)
    obj = {"state_dict": {"0.weight": weight, "1.num_batches_tracked": torch.tensor(7)},
           "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3, 2)}},
                         "param_groups": [{"params": [0], "lr": torch.tensor(0.5, requires_grad=True),
                                           "betas": (0.9, 0.999)}]},
           "epoch": 3, "sums": {"loss": 1.5, "seen": 64}, "name": None, "shapes": [(1, 2), [3]],
           "pair": (torch.ones(2, requires_grad=True), 4)}
    copied = on_cpu(obj)           # on a CPU, .cpu() returns the tensor itself: detach() shows the copy
    assert not copied["state_dict"]["0.weight"].requires_grad and torch.equal(copied["state_dict"]["0.weight"], weight)
    group = copied["optimizer"]["param_groups"][0]
    assert group["params"] == [0] and group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple)
    assert float(group["lr"]) == 0.5 and not group["lr"].requires_grad                  # inside a list
    assert isinstance(copied["pair"], tuple) and not copied["pair"][0].requires_grad and copied["pair"][1] == 4
    assert copied["shapes"] == [(1, 2), [3]] and isinstance(copied["shapes"][0], tuple)
    assert {k: copied[k] for k in ("epoch", "sums", "name")} == {"epoch": 3, "sums": {"loss": 1.5, "seen": 64},
                                                                 "name": None}
    save_atomic(obj, tmp_path / "last.pt")
    assert storage_locations(tmp_path / "last.pt") == {"cpu"}
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.ones(3, 2)) and loaded["epoch"] == 3
    assert not loaded["pair"][0].requires_grad          # torch.save keeps requires_grad: on_cpu was applied


@pytest.mark.slow
def test_training_run_writes_its_log_and_model(reference_run):
    out, result = reference_run
    log = read_log(out)
    assert set(log[0]) >= {"config", "versions", "device"} and log[0]["config"]["hdim"] == 32
    epochs = [r for r in log if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for r in epochs:
        assert set(r) >= {"epoch", "train_loss", "train_acc", "lr", "epoch_seconds", "images_per_second"}
    assert ["test_acc" in r for r in epochs] == [False, True, True]   # --eval-every 2, and the last
    final = log[-1]
    assert final["final"] and set(final) >= {"test_acc", "test_acc_flip_tta", "wall_seconds", "device"}
    # The result is the model after the last epoch, evaluated again: not the best epoch's.
    assert final["test_acc"] == epochs[-1]["test_acc"]
    if REAL_DATA:                              # on FakeData's noise the accuracy stays at chance
        assert final["test_acc"] != epochs[1]["test_acc"]
    assert epochs[-1]["lr"] == 0.0 and max(r["lr"] for r in epochs) <= 0.01
    assert f"final test accuracy {final['test_acc']:.2f}%" in result.stdout

    saved = torch.load(out / "model.pt", weights_only=True)
    assert storage_locations(out / "model.pt") == {"cpu"}
    c = saved["config"]
    assert set(c) >= {"hdim", "depth", "ksize", "psize", "n_classes", "mean", "std"}
    model = ConvMixer(c["hdim"], c["depth"], c["ksize"], c["psize"], c["n_classes"])
    model.load_state_dict(saved["state_dict"], strict=True)
    assert (out / "last.pt").exists() and not list(out.glob("*.tmp"))
    last = torch.load(out / "last.pt", weights_only=True)        # written after the last epoch
    assert last["epoch"] == 3 and all(torch.equal(last["state_dict"][k], v) for k, v in saved["state_dict"].items())


@pytest.mark.slow
@pytest.mark.skipif(REAL_DATA is None, reason="needs the real CIFAR-10 (set CIFAR10_ROOT)")
def test_tiny_model_learns_real_cifar10(reference_run):
    assert read_log(reference_run[0])[-1]["test_acc"] > 25.0         # chance is 10%


@pytest.mark.slow
def test_eval_reproduces_the_logged_accuracy(reference_run):
    out, _ = reference_run
    result = run_script("--eval", out / "model.pt", "--device", "cpu", *DATA)
    final = read_log(out)[-1]
    assert result.stdout.startswith(f"evaluating {out / 'model.pt'}: ")    # first, what it is about to do
    assert f"test accuracy {final['test_acc']:.2f}% (flip-TTA {final['test_acc_flip_tta']:.2f}%)" in result.stdout


@pytest.mark.slow
def test_same_seed_same_run_with_any_number_of_workers(reference_run, tmp_path):
    run_script(*TINY, "--workers", "2", "--out", tmp_path / "again")
    assert without_timings(read_log(tmp_path / "again")) == without_timings(read_log(reference_run[0]))


def test_fast_batches_resume_mid_chunk_exactly():
    from fast.augment import BatchAugment, device_batches
    import train_cifar
    images, labels = sample_images(80), torch.arange(80) % 10
    plan = train_cifar.EpochPlan(80, 8, seed=1, epoch=2)
    augment = BatchAugment(train_cifar.RANDAUGMENT_OPS, CIFAR10_MEAN, CIFAR10_STD)
    whole = list(device_batches(plan, 0, images, labels, augment, chunk_images=24))  # 3 steps a chunk
    assert len(whole) == 10 and all(x.shape == (8, 3, 32, 32) for x, _ in whole)
    assert [y.tolist() for _, y in whole] == [[plan.order[j] % 10 for j in range(8 * s, 8 * s + 8)]
                                             for s in range(10)]
    for first in (4, 6, 9):                                           # inside and at chunk starts
        resumed = list(device_batches(plan, first, images, labels, augment, chunk_images=24))
        assert len(resumed) == 10 - first
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, whole[first:]))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["plain", "fast"])
def test_interrupt_then_resume_equals_uninterrupted(path, reference_run, tmp_path):
    flags = [*TINY, "--workers", "0", "--fast" if path == "fast" else "--no-fast"]
    if path == "plain":
        reference = reference_run[0]
    else:
        reference = tmp_path / "uninterrupted"
        run_script(*flags, "--out", reference)
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cifar.py"), *flags, "--out", str(out),
                             "--progress-every", "0"],                # a progress line every step
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:                                          # until epoch 2 is under way
        seen.append(line)
        if line.startswith("  epoch 2 step 2/"):
            break
    assert proc.poll() is None, "".join(seen) + proc.stderr.read()
    proc.send_signal(signal.SIGINT)                                  # during epoch 2
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert "--resume --out" in stderr and "Traceback" not in stderr
    assert not (out / "model.pt").exists()
    stopped = torch.load(out / "last.pt", weights_only=True)
    steps_per_epoch = read_log(reference)[0]["config"]["n_train"] // 128
    assert stopped["epoch"] == 1 and 0 < stopped["step"] < steps_per_epoch     # mid-epoch

    result = run_script("--resume", "--out", out, "--workers", "0", "--eval-every", "2", *DATA)
    log = read_log(out)
    assert any(r.get("resumed") for r in log), "the log must show the resume"
    assert without_timings(log) == without_timings(read_log(reference))
    assert "final test accuracy" in result.stdout
    # The saved tensors themselves: weights, BatchNorm statistics, optimizer state.
    for name in ("model.pt", "last.pt"):
        resumed, uninterrupted = (torch.load(d / name, weights_only=True) for d in (out, reference))
        for key, value in uninterrupted["state_dict"].items():
            assert torch.equal(resumed["state_dict"][key], value), (name, key)
    resumed_opt, reference_opt = (torch.load(d / "last.pt", weights_only=True)["optimizer"]
                                  for d in (out, reference))
    for index, state in reference_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_opt["state"][index][key], value), (index, key)


@pytest.mark.slow
def test_val_holds_out_the_last_training_images_and_reports_them(tmp_path):
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "3",
                        "--batch-size", "100", "--fake-data", "1000", "--val", "300", "--eval-every", "2",
                        "--device", "cpu", "--workers", "0", "--out", tmp_path / "o")
    log = read_log(tmp_path / "o")
    assert log[0]["config"]["n_train"] == 700
    epochs = [r for r in log if "train_loss" in r]
    assert [("test_acc" in r, "val_acc" in r) for r in epochs] == [(False, False), (True, True), (True, True)]
    assert "val_acc" in log[-1] and log[-1]["final"]
    assert f"test {epochs[1]['test_acc']:5.2f}%  val {epochs[1]['val_acc']:5.2f}%" in result.stdout


@pytest.mark.slow
def test_resume_between_the_last_epoch_and_the_final_evaluation_finishes_the_run(reference_run, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(reference_run[0], out)
    finished = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    log = read_log(out)
    (out / "model.pt").unlink()                                   # a kill after the last last.pt
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:-1]))
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA)
    assert "all 3 epochs are done" in result.stdout
    assert without_timings(read_log(out)) == without_timings(log)
    again = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], finished[k]) for k in finished)
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA, check=False)
    assert result.returncode == 1 and "has already finished all its epochs" in result.stderr


def child_pids(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.parametrize("signum, to, workers", [(signal.SIGTERM, "the process", 0),
                                                 (signal.SIGTERM, "its group", 2),
                                                 (signal.SIGINT, "its group", 2)])
def test_sigterm_and_ctrl_c_save_and_say_how_to_resume(tmp_path, signum, to, workers):
    """To "its group": every process of the run, data workers included, gets the signal, as from
    `timeout`, a terminal's Ctrl-C, systemd or a batch scheduler. The workers must leave it to the
    main process, which saves the steps done so far, not fail in the middle of a step. It is sent
    as soon as the first worker exists, its first instants being the hardest (it failed 2 times in 8
    while workers were forked with SIGTERM unblocked)."""
    if to == "its group" and not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs Linux's /proc/PID/task/PID/children to see the data workers")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cifar.py"), "--hdim", "16", "--depth", "1",
                             "--psize", "4", "--epochs", "50", "--batch-size", "50", "--fake-data", "1000",
                             "--device", "cpu", "--workers", str(workers), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() or workers and not child_pids(proc.pid):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    if to == "the process":
        proc.send_signal(signum)
    else:
        os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stdout + stderr
    name = signal.Signals(signum).name
    assert f"{name}: stopped at" in stderr and f"--resume --out {out}" in stderr and "Traceback" not in stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["epoch"] < 50 and (saved["epoch"], saved["step"]) != (0, 0)   # the steps done are kept
    while time.time() < deadline:                  # and no worker is left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a data worker outlived the run")


def a_data_worker(ready):
    from trainer.housekeeping import leave_stops_to_the_main_process
    leave_stops_to_the_main_process(0)
    ready.set()
    time.sleep(60)


@pytest.mark.skipif(sys.platform != "linux", reason="elsewhere PyTorch's own handling stays")
def test_a_data_worker_ends_on_a_sigterm_from_its_main_process_only():
    """DataLoader ends a worker that does not stop with SIGTERM (Process.terminate); any other
    sender's SIGTERM is the main process's to handle. The trainer's workers are forked on Linux
    (whatever Python's default), which this needs: a worker started otherwise may have a thread
    that takes the signal before the init function runs."""
    import multiprocessing
    from trainer.housekeeping import data_workers
    if sys.platform == "linux":
        assert data_workers(2)["multiprocessing_context"] == "fork"
    assert data_workers(0) == {"num_workers": 0, "worker_init_fn": None, "multiprocessing_context": None}
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=a_data_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    subprocess.run([sys.executable, "-c", f"import os; os.kill({worker.pid}, {int(signal.SIGTERM)})"],
                   check=True)                                            # from another process
    worker.join(1)
    assert worker.is_alive()
    worker.terminate()                                                    # from its main process
    worker.join(30)
    assert worker.exitcode == 0


@pytest.mark.slow
@pytest.mark.parametrize("step_mode", ["host", "device"])
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, step_mode):
    """host: found at once; device: found on the device, read at the epoch's end, the same words."""
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "1",
                        "--batch-size", "100", "--fake-data", "400", "--device", "cpu", "--workers", "0",
                        "--step-mode", step_mode, "--lr", "1e30", "--out", tmp_path / "o", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss became nan or inf at epoch 1, step 2" in result.stderr


def test_missing_data_without_network_says_where_the_files_go(tmp_path, monkeypatch):
    import torchvision
    import train_cifar
    # A local port that refuses connections stands in for "no network".
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(train_cifar.Fail, match="cifar-10-batches-py") as e:
        train_cifar.load_cifar10(str(tmp_path / "empty"), train=True)
    assert str(tmp_path / "empty") in str(e.value)


@pytest.mark.parametrize("argv,expected", [
    (["--hdim", "0"], "--hdim"), (["--depth", "-1"], "--depth"), (["--ksize", "0"], "--ksize"),
    (["--psize", "-2"], "--psize"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"), (["--reprob", "2"], "--reprob"),
    (["--subset", "0"], "--subset"), (["--subset", "60000"], "--subset"),
    (["--val", "50000"], "--val"), (["--subset", "49000", "--val", "2000"], "--subset"),
    (["--subset", "100", "--batch-size", "128"], "--batch-size"),
    (["--workers", "-1"], "--workers"), (["--eval-every", "-1"], "--eval-every"),
    (["--ra-m", "11"], "--ra-m"), (["--ra-p", "1.5"], "--ra-p"), (["--ra-mstd", "-1"], "--ra-mstd"),
    (["--psize", "64"], "--psize"), (["--progress-every", "-1"], "--progress-every"),
    (["--seed", "99999999999999999999"], "--seed"), (["--lr", "inf"], "--lr"), (["--wd", "nan"], "--wd"),
    (["--hdim", "100000"], "--hdim"), (["--workers", "1000"], "--workers"),
    (["--psize", "4", "--ksize", "16"], "--ksize"),
    (["--device", "nonsense"], "--device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--resume"], "--resume"),
])
def test_bad_flags_fail_at_start_naming_the_flag(argv, expected, capsys):
    import train_cifar
    with pytest.raises(SystemExit) as e:
        train_cifar.parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]          # not the usage text above it
    assert e.value.code == 2 and error.startswith("train_cifar.py: error: ") and expected in error, error


def test_a_device_that_is_not_here_is_one_line_naming_it(monkeypatch, capsys):
    """Before any data is read: an accelerator this machine lacks, or a GPU index beyond its GPUs."""
    import train_cifar
    if not torch.backends.mps.is_available():
        with pytest.raises(SystemExit):
            train_cifar.parse_args(["--device", "mps"])
        assert "error: --device mps: MPS is not available here" in capsys.readouterr().err
    as_on_a_gpu(monkeypatch)                                             # a machine with one GPU
    assert train_cifar.parse_args(["--device", "cuda:0"]).fast is (train_cifar.triton_version() is not None)
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--device", "cuda:1"])
    assert "error: --device cuda:1: there is no cuda device 1 here (1 in all, numbered from 0)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("machine, flags, expected", [
    # machine: a CUDA GPU's compute capability, "no triton" on an H100, "mps" or "cpu"
    ((9, 0), [], ("cuda", "bfloat16", True, "graph", [])),                      # H100, H200
    ((8, 6), [], ("cuda", "bfloat16", True, "graph", [])),                      # RTX 30xx, A10
    ((7, 5), [], ("cuda", "float16", False, "host", ["compute capability 8.0 or more, this GPU has 7.5"])),
    ((7, 0), [], ("cuda", "float16", False, "host", ["this GPU has 7.0"])),        # V100
    ((7, 5), ["--amp-dtype", "bfloat16", "--fast"], ("cuda", "bfloat16", True, "graph", [])),
    ((9, 0), ["--no-amp"], ("cuda", "bfloat16", True, "graph", [])),            # float32: amp is off
    ("no triton", [], ("cuda", "bfloat16", False, "host", ["Triton is not installed here"])),
    ("mps", [], ("mps", "float32", False, "host", [])),
    ("cpu", [], ("cpu", "float32", False, "host", [])),
    ("cpu", ["--amp-dtype", "float16"], ("cpu", "float16", False, "host", [])),
])
def test_precision_fast_path_and_device_are_chosen_by_the_hardware(monkeypatch, machine, flags, expected):
    """bfloat16 where the GPU computes it natively, float16 (with loss scaling) on older GPUs, float32
    on MPS and CPUs; the fast path where it is tested to pay; each flag given wins over the choice."""
    import train_cifar
    monkeypatch.setattr(train_cifar, "triton_version", lambda: None if machine == "no triton" else "3.6.0")
    if machine in ("mps", "cpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: machine == "mps")
        monkeypatch.setattr(torch.mps, "is_available", lambda: machine == "mps", raising=False)
    else:
        as_on_a_gpu(monkeypatch, (9, 0) if machine == "no triton" else machine)
    a = train_cifar.parse_args(flags)
    device, amp_dtype, fast, step_mode, notes = expected
    assert (a.device, a.amp_dtype, a.fast, a.step_mode) == (device, amp_dtype, fast, step_mode)
    assert len(a.notes) == len(notes) and all(n in line for n, line in zip(notes, a.notes))
    assert all(line.startswith("plain path: ") and line.endswith("(--fast asks for it)") for line in a.notes)
    assert train_cifar.autocast_dtype(a) == (None if "--no-amp" in flags or amp_dtype == "float32"
                                            else getattr(torch, amp_dtype))


def test_a_precision_the_machine_or_the_fast_path_cannot_run_is_one_line(monkeypatch, capsys, tmp_path,
                                                                         keep_signal_handlers):
    """float16 with anything of fast/ (tested in bfloat16 and float32 only), autocast or fast/ on MPS,
    bfloat16 on a GPU that cannot compute it: refused at the start, naming the flags."""
    as_on_a_gpu(monkeypatch, (7, 5), bf16_emulated=False)
    cases = [(["--fast"], "--amp-dtype float16 (loss scaling) is not tested with --fast --step-mode graph"),
             (["--step-mode", "device"], "is not tested with --step-mode device"),
             (["--amp-dtype", "bfloat16"], "cannot compute in bfloat16; use --amp-dtype float16")]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4", raising=False)
    for flags, words in cases:
        lines = error_lines_of_main([*FAKE_CUDA, "--out", tmp_path / "o", *flags], capsys)
        assert len(lines) == 1 and words in lines[0], (flags, lines)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "is_available", lambda: True, raising=False)
    for flags in (["--fast"], ["--amp-dtype", "float16"]):
        lines = error_lines_of_main([*FAKE_CUDA[:-2], "--out", tmp_path / "o", *flags], capsys)
        assert len(lines) == 1 and "--device mps runs the plain path in float32" in lines[0], (flags, lines)
    assert not (tmp_path / "o").exists()                    # refused before anything is written


FAKE_CUDA = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--epochs", "1", "--workers", "0",
             "--fake-data", "100", "--batch-size", "50", "--device", "cuda"]


def test_float16_loss_scaling_skips_a_step_whose_gradients_overflow(monkeypatch):
    """PyTorch's AMP recipe in train_step: the scaled loss backward, the gradients unscaled before
    clipping, a step with an inf gradient skipped (weights and AdamW's moments untouched) and the
    scale halved, and the next step taken."""
    import train_cifar
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, train_cifar.parse_args(["--device", "cpu"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, targets = torch.randn(8, 3, 32, 32), nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    norms, clip_grad_norm = [], nn.utils.clip_grad_norm_
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", lambda params, clip: norms.append(clip_grad_norm(params, clip)))

    def step():
        return train_cifar.train_step(model, optimizer, criterion, x, targets, 0.01, torch.float16, 1.0, scaler)
    step()
    assert norms[-1] < 100 and scaler.get_scale() == 2.0**10          # clipped after unscaling
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    hook = model[0].weight.register_hook(lambda grad: grad * float("inf"))        # an overflow
    assert step() is not None                                    # not a failed run: a skipped step
    hook.remove()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments))
    step()
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_every_train_cifar_flag_that_the_project_mentions_exists(capsys):
    """README, notebook, docstrings and tools name train_cifar.py's flags; a renamed or removed
    flag must not live on in them (--benchmark, moved to fast/benchmark.py, once did)."""
    import re
    import train_cifar
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--help"])
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert {"--hdim", "--resume", "--save-every", "--no-fast", "--step-mode"} <= known
    cells = json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]
    texts = {"tutorial.ipynb": "\n".join("".join(c["source"]) for c in cells),
             **{name: (ROOT / name).read_text() for name in
                ("README.md", "results/README.md", "fast/README.md", "docs/model.md")}}
    for folder, pattern in [(".", "*.py"), ("trainer", "*.py"), ("fast", "*.py"), ("tools", "*")]:
        texts.update({str(f.relative_to(ROOT)): f.read_text() for f in sorted((ROOT / folder).glob(pattern))
                      if f.is_file()})
    unknown = [(name, flag, line.strip()) for name, text in texts.items() for line in text.splitlines()
               if "train_cifar.py" in line
               for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line[line.index("train_cifar.py"):])
               if flag not in known]
    assert not unknown, unknown


def test_every_flag_with_a_bad_value_fails_in_one_line_naming_it(capsys):
    """A sweep: each numeric flag with values a user might type by mistake either works or is
    refused at start with one line that names it."""
    import argparse
    import train_cifar
    parser_flags = []
    original = argparse.ArgumentParser.parse_args

    def capture(parser, args=None, namespace=None):
        parser_flags.extend(a.option_strings[0] for a in parser._actions
                            if a.option_strings and a.type in (int, float))
        return original(parser, args, namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        train_cifar.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    assert len(parser_flags) > 25
    refused = 0
    for flag in parser_flags:
        for value in ["abc", "nan", "inf", "-1", "-1e9", "1e30", "99999999999999999999"]:
            try:
                train_cifar.parse_args([flag, value])
            except SystemExit as e:
                error = capsys.readouterr().err.strip().splitlines()
                assert e.code == 2 and len(error) == 1 and flag in error[0], (flag, value, error)
                refused += 1
    assert refused > 150


@pytest.mark.slow
def test_existing_out_and_bad_checkpoints_fail_naming_the_file(reference_run, tmp_path, capsys):
    out, _ = reference_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(out / "model.pt", weights_only=True)
    torch.save({**saved, "config": {**saved["config"], "hdim": 48}}, mismatched)
    older = tmp_path / "older"                      # a run whose recipe lacks a newer key
    shutil.copytree(out, older)
    state = torch.load(older / "last.pt", weights_only=True)
    del state["recipe"]["ra_p"]
    torch.save(state, older / "last.pt")
    before_step_mode = tmp_path / "before_step_mode"      # a key added later: the value it ran with
    shutil.copytree(out, before_step_mode)
    (before_step_mode / "model.pt").unlink()
    (before_step_mode / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(out)[:-1]))
    state = torch.load(before_step_mode / "last.pt", weights_only=True)
    del state["recipe"]["step_mode"]
    torch.save(state, before_step_mode / "last.pt")
    run_script("--resume", "--out", before_step_mode, "--device", "cpu", "--workers", "0", *DATA)
    cases = [
        (["--resume", "--out", older], "lacks ra_p"),
        (["--out", out], f"--out {out}"),
        (["--resume", "--out", tmp_path / "none"], "log.jsonl does not exist"),
        (["--eval", tmp_path / "missing.pt"], "missing.pt"),
        (["--eval", garbage], "garbage.pt"),
        (["--eval", mismatched, "--fake-data", "10"], "mismatched.pt"),
    ]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    corrupt = tmp_path / "corrupt"
    if REAL_DATA:                                   # a truncated batch file
        shutil.copytree(Path(REAL_DATA) / "cifar-10-batches-py", corrupt / "cifar-10-batches-py")
        batch = corrupt / "cifar-10-batches-py" / "data_batch_3"
        batch.write_bytes(batch.read_bytes()[:1000])
        cases.append((["--data", corrupt, "--epochs", "1", "--out", tmp_path / "c"], "data_batch_3 fails"))
    cases += [
        (["--out", a_file, "--fake-data", "200"], "is a file"),
        (["--data", a_file, "--epochs", "1", "--out", tmp_path / "d"], f"--data {a_file}"),
        (["--out", "/proc/convmixer-run", "--fake-data", "200", "--batch-size", "50", "--workers", "0"],
         "--out /proc/convmixer-run: cannot write there"),                    # not writable, even by root
        (["--out", a_file / "run", "--fake-data", "200", "--batch-size", "50", "--workers", "0"],
         f"--out {a_file / 'run'}: cannot write there"),
    ]
    for argv, expected in cases:          # in this process: a start of Python and torch each is 5 s
        error = error_lines_of_main([*argv, "--device", "cpu"], capsys)
        assert len(error) == 1 and error[0].startswith("train_cifar.py: error: "), (argv, error)
        assert expected in error[0], (argv, error)
    assert not any((tmp_path / name).exists() for name in ("none", "c", "d"))
    result = run_script("--eval", garbage, check=False)             # and one as a user sees it
    error = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(error) == 1, result.stderr
    assert error[0].startswith(f"train_cifar.py: error: --eval {garbage}: cannot read it as a checkpoint")


@pytest.mark.slow
def test_progress_lines_and_an_early_estimate_of_the_whole_run_in_a_log_file(tmp_path):
    result = run_script("--hdim", "16", "--depth", "1", "--psize", "4", "--epochs", "2",
                        "--batch-size", "50", "--fake-data", "500", "--device", "cpu", "--workers", "0",
                        "--progress-every", "0", "--out", tmp_path / "o")
    lines = result.stdout.splitlines()                  # stdout is a pipe here, not a terminal
    steps = [line for line in lines if line.startswith("  epoch ")]
    assert len(steps) == 2 * 10 and all("img/s  ETA " in line for line in steps)
    assert "\r" not in result.stdout
    assert sum(line.startswith("estimate: at ") for line in lines) == 1
    assert "the whole run of 20 steps takes about" in result.stdout


def test_a_cpu_run_that_would_take_days_says_so_and_points_to_the_quick_check(monkeypatch, capsys):
    import argparse
    import time
    import train_cifar
    clock = iter([1000.0, 1010.0])                      # the first step takes 10 s
    monkeypatch.setattr(time, "time", lambda: next(clock, 1010.0))
    recipe = argparse.Namespace(n_train=50_000, batch_size=64, epochs=200)
    progress = train_cifar.Progress(recipe, 0, every=5, device=torch.device("cpu"))
    progress.step(0, 1, 2.3)
    out = capsys.readouterr().out
    assert "156,200 steps takes about 18d01h" in out and "--epochs 2 --subset 2000" in out
    # The suggested flags are train_cifar.py's, and they do make a small, short run.
    quick = train_cifar.parse_args(out[out.index("--hdim"):].split(" checks ")[0].split() + ["--device", "cpu"])
    assert (quick.hdim, quick.depth, quick.psize, quick.epochs, quick.n_train) == (32, 2, 2, 2, 2000)


def test_train_cifar_reads_top_to_bottom_as_the_recipe_alone():
    """The trainer stays a script to read: the housekeeping and the RandAugment table live in
    trainer/, the speed code and the benchmark in fast/ (imported only where a flag asks for it),
    and no function is longer than a screen."""
    import ast
    source = (ROOT / "train_cifar.py").read_text()
    assert len(source.splitlines()) <= 600
    top_level_imports = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_level_imports if "fast" in ast.unparse(n)]
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    too_long = [f.name for f in functions if f.end_lineno - f.lineno + 1 > 60 and f.name != "parse_args"]
    assert not too_long
    assert "profiler" not in source and "def benchmark" not in source


FAKE = ["--hdim", "8", "--depth", "1", "--ksize", "3", "--psize", "4", "--device", "cpu", "--workers", "0"]


def test_learning_rate_and_clipping_reach_every_step(tmp_path, monkeypatch, keep_signal_handlers):
    import train_cifar
    steps, original = [], train_cifar.train_step

    def recording(net, optimizer, criterion, images, targets, lr, amp, clip, *rest):
        result = original(net, optimizer, criterion, images, targets, lr, amp, clip, *rest)
        steps.append((lr, [g["lr"] for g in optimizer.param_groups], clip, len(images)))
        return result

    monkeypatch.setattr(train_cifar, "train_step", recording)
    args = train_cifar.parse_args([*FAKE, "--epochs", "2", "--batch-size", "50", "--fake-data", "250",
                                   "--out", str(tmp_path / "o")])
    train_cifar.train(args)
    expected = [train_cifar.one_cycle_lr((i + 1) / 10, 0.01) for i in range(10)]   # 5 steps an epoch
    assert [lr for lr, *_ in steps] == pytest.approx(expected)
    assert all(group_lrs == [lr, lr] for lr, group_lrs, *_ in steps)      # what AdamW really used
    assert {clip for *_, clip, _ in steps} == {1.0} and {n for *_, n in steps} == {50}
    assert len(set(round(lr, 12) for lr, *_ in steps[:5])) == 5            # changes inside an epoch


def test_one_cycle_schedule():
    import train_cifar
    lr = train_cifar.one_cycle_lr
    assert lr(0.0, 0.01) == 0 and lr(0.2, 0.01) == pytest.approx(0.005)
    assert lr(0.4, 0.01) == pytest.approx(0.01) and lr(0.8, 0.01) == pytest.approx(0.0005)
    assert lr(0.6, 0.01) == pytest.approx(0.00525) and lr(0.9, 0.01) == pytest.approx(0.00025)
    assert lr(1.0, 0.01) == pytest.approx(0.0)


def test_gradient_clipping_bounds_the_update():
    import train_cifar
    recipe = train_cifar.parse_args(FAKE)
    torch.manual_seed(0)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    optimizer = train_cifar.make_optimizer(model, recipe)
    norms = []
    optimizer.step = lambda: norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    targets = nn.functional.one_hot(torch.arange(8) % 10, 10).float()

    def steep_loss(logits, targets):                    # gradients far above norm 1
        return 1000 * nn.functional.cross_entropy(logits, targets)
    for clip in (1.0, 0.0):                             # 0: no clipping
        train_cifar.train_step(model, optimizer, steep_loss, torch.randn(8, 3, 32, 32), targets, 0.01,
                               None, clip)
    assert norms[0] == pytest.approx(1.0, rel=1e-4) and norms[1] > 2


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    import train_cifar
    recipe = train_cifar.parse_args(FAKE)
    model = ConvMixer(8, 1, 3, 4, n_classes=10)
    for m in model.modules():                          # non-trivial BatchNorm weights and biases
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = train_cifar.make_optimizer(model, recipe)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                   # Adam's own step is then zero: only decay acts
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.01 * 0.01 if p.ndim > 1 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    assert optimizer.defaults["eps"] == 1e-3


def test_loss_is_label_smoothed_cross_entropy_on_soft_targets(tmp_path, keep_signal_handlers):
    import train_cifar
    run = train_cifar.Run(train_cifar.parse_args([*FAKE, "--epochs", "1", "--batch-size", "50",
                                                  "--fake-data", "200", "--out", str(tmp_path / "o")]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 0, 0, 0, 0, 0, 0, 1.0]])
    targets = torch.zeros(1, 10)
    targets[0, 0], targets[0, 2] = 0.7, 0.3                                  # a mixed image
    smoothed = 0.9 * targets + 0.1 / 10
    expected = -(smoothed * logits.log_softmax(1)).sum()
    assert run.criterion(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_val_is_the_last_training_images_and_never_trained_on(tmp_path, keep_signal_handlers):
    import train_cifar
    run = train_cifar.Run(train_cifar.parse_args([*FAKE, "--epochs", "1", "--batch-size", "50",
                                                  "--fake-data", "500", "--val", "100",
                                                  "--out", str(tmp_path / "o")]))
    images, labels = train_cifar.load_fake(500, True, 0)
    assert torch.equal(run.val[0], images[400:]) and torch.equal(run.val[1], labels[400:])
    assert torch.equal(run.data["dataset"].images, images[:400])     # what the batches index


def test_defaults_are_the_papers_cifar10_recipe():
    import train_cifar
    a = train_cifar.parse_args([])
    assert (a.hdim, a.depth, a.ksize, a.psize, a.epochs, a.batch_size) == (256, 8, 9, 1, 200, 64)
    assert (a.lr, a.wd, a.eps, a.clip, a.label_smoothing, a.amp) == (0.01, 0.01, 1e-3, 1.0, 0.1, True)
    assert (a.scale, a.ra_n, a.ra_m, a.ra_mstd, a.ra_p) == (0.75, 2, 9, 0.5, 0.5)
    assert (a.mixup, a.cutmix, a.reprob) == (0.5, 0.5, 0.25)
    # The fast path and its graph step on CUDA; the plain reference, its loss checked on the host,
    # on a CPU.
    cuda = torch.cuda.is_available()
    assert a.fast == cuda and a.step_mode == ("graph" if cuda else "host") and not a.compile
    assert train_cifar.parse_args(["--device", "cpu"]).fast is False
    cpu_fast = train_cifar.parse_args(["--device", "cpu", "--fast"])
    assert cpu_fast.fast is True and cpu_fast.step_mode == "host"
    optimizer = train_cifar.make_optimizer(ConvMixer(8, 1, 3, 4), a)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)


def test_the_short_recipe_is_the_official_scripts_quick_setting_and_a_given_flag_wins():
    """--recipe short: ConvMixer-256/8 k5 p2, 25 epochs at batch 512 with the official
    convmixer-cifar10 script's light regularization; any flag given with it keeps its value, and
    --recipe paper is the defaults."""
    import train_cifar
    paper, short = (train_cifar.parse_args(["--device", "cpu", *flags]) for flags in ([], ["--recipe", "short"]))
    named_paper = train_cifar.parse_args(["--device", "cpu", "--recipe", "paper"])
    assert {**vars(named_paper), "given": None} == {**vars(paper), "given": None}
    assert (short.hdim, short.depth, short.ksize, short.psize, short.epochs, short.batch_size) == (256, 8, 5, 2, 25, 512)
    assert (short.lr, short.wd, short.scale, short.mixup, short.cutmix, short.reprob) == (0.05, 0.005, 1.0, 0, 0, 0)
    assert (short.ra_n, short.ra_m, short.ra_mstd, short.ra_p) == (2, 4.0, 0.0, 1.0)
    assert (short.label_smoothing, short.clip, short.eps, short.seed) == (paper.label_smoothing, paper.clip,
                                                                         paper.eps, paper.seed)
    tuned = train_cifar.parse_args(["--device", "cpu", "--recipe", "short", "--lr", "0.02", "--epochs", "30"])
    assert (tuned.lr, tuned.epochs, tuned.wd) == (0.02, 30, 0.005)
    assert tuned.n_train == 50_000 and train_cifar.parse_args(
        ["--device", "cpu", "--recipe", "short", "--val", "5000"]).n_train == 45_000


def test_on_cuda_the_default_step_is_the_fast_paths_graph_and_the_benchmark_names_each_path(monkeypatch):
    """The step-mode default, as a machine with CUDA gets it; the benchmark's paths give every flag
    in full, so that "plain" is not the CUDA default (the fast path) and "fast" not its graph step."""
    import train_cifar
    from fast import benchmark
    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(train_cifar, "triton_version", lambda: "3.6.0")
    modes = {tuple(flags): (a.fast, a.step_mode, a.compile) for flags in
             [[], ["--compile"], ["--no-fast"], ["--step-mode", "device"], ["--fast", "--step-mode", "host"]]
             for a in [train_cifar.parse_args(["--device", "cuda", *flags])]}
    assert modes == {(): (True, "graph", False), ("--compile",): (True, "host", True),
                     ("--no-fast",): (False, "host", False), ("--step-mode", "device"): (True, "device", False),
                     ("--fast", "--step-mode", "host"): (True, "host", False)}
    args = benchmark.parse_args(["--device", "cuda", "--out", "unused"])
    recipes = {path: benchmark.recipe_for(args, 64, path) for path in benchmark.PATHS}
    assert {path: (r.fast, r.step_mode) for path, r in recipes.items()} == {
        "plain": (False, "host"), "fast": (True, "host"), "fast_device": (True, "device"),
        "fast_graph": (True, "graph")}


def test_cpu_transform_crops_flips_and_erases_at_the_recipes_rates():
    """train_transform without RandAugment, on a horizontal ramp: the crop's width shows in the
    output's range, a flip in its direction, an erased box in values no pixel can take."""
    import train_cifar
    recipe = train_cifar.parse_args(["--ra-n", "0"])
    transform = train_cifar.train_transform(recipe)
    ramp = (torch.arange(32) * 8).view(1, 1, 32).expand(3, 32, 32).to(torch.uint8)
    torch.manual_seed(0)
    flipped, erased, widths = 0, 0, []
    for _ in range(2000):
        x = transform(ramp)[0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]            # back to [0, 1]
        if (x < -0.1).any() or (x > 1.1).any():                            # N(0, 1) noise: erased
            erased += 1
            continue
        row = x[16]
        flipped += int(row[0] > row[-1])
        widths.append((row.max() - row.min()).item() * 255 / 8 + 1)        # ~ the crop's width
    assert abs(erased / 2000 - 0.25) < 0.04
    assert abs(flipped / len(widths) - 0.5) < 0.05
    widths = torch.tensor(widths)
    # scale 0.75-1 of the area, aspect 3/4-4/3: widths from 24 pixels (bicubic may overshoot the
    # range a little); measured 29.4 on average, 26.8 with scale 0.5-1
    assert widths.min() >= 23.5 and widths.quantile(0.1) >= 25.5 and 28.7 < widths.mean() < 30


def test_batch_mixing_chooses_mixup_or_cutmix_per_batch():
    import train_cifar
    mix = train_cifar.batch_mixing(train_cifar.parse_args([]))
    images = (torch.arange(10).float() * 10).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    kinds = [len(torch.unique(mix(images, torch.arange(10))[0][0])) for _ in range(200)]
    assert 70 < kinds.count(1) < 130 and kinds.count(1) + kinds.count(2) == 200   # 1: MixUp, 2: CutMix


def test_each_epoch_shuffles_the_images_from_seed_and_epoch_alone():
    import train_cifar
    plans = {(seed, epoch): train_cifar.EpochPlan(1000, 64, seed, epoch) for seed in (0, 1) for epoch in (0, 1)}
    for plan in plans.values():
        assert sorted(plan.order) == list(range(1000)) and plan.steps == 15          # last batch dropped
        assert plan.order != list(range(1000)) and len(set(plan.image_seeds)) == 1000
    orders = [tuple(p.order) for p in plans.values()]
    assert len(set(orders)) == 4                                          # differs by seed and epoch
    assert train_cifar.EpochPlan(1000, 64, 1, 1).order == plans[1, 1].order
    batches = plans[0, 0].batches(first_step=3)
    assert len(batches) == 12 and [i for i, _ in batches[0]] == plans[0, 0].order[192:256]


def record_training_batches(monkeypatch, argv):
    """Run train_cifar.train on 64 copies of one image (so that any two augmented images differ only
    by their random draws) and return what each step was given: [(images, targets)] in order."""
    import train_cifar
    image = sample_images(1)[0]
    monkeypatch.setattr(train_cifar, "load_fake",
                        lambda n, train, seed: (image.expand(n, 3, 32, 32).clone(), torch.arange(n) % 10))
    steps = []

    def record(net, optimizer, criterion, images, targets, *rest):
        steps.append((images.clone(), targets.clone()))
        return 2.3, 0.0
    monkeypatch.setattr(train_cifar, "train_step", record)
    train_cifar.train(train_cifar.parse_args([*FAKE, "--fake-data", "64", "--batch-size", "16",
                                              "--epochs", "2", *argv]))
    return steps


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_every_random_choice_changes_where_the_recipe_says_and_repeats_with_the_seed(
        path, tmp_path, monkeypatch, keep_signal_handlers):
    """Per image (crop, flip, ops, magnitudes, erasing), per step (MixUp or CutMix, and its lambda),
    per epoch (the order and the images' draws) and, with --fast, per chunk of steps: each choice is
    drawn anew where the recipe draws it, shared where it shares it, and the same for the same seed."""
    import fast.augment
    monkeypatch.setattr(fast.augment, "AUGMENT_CHUNK_IMAGES", 32)        # 2 chunks of 2 steps an epoch
    flags = ["--fast" if path == "fast" else "--no-fast"]
    runs = {}
    for name, argv in {"unmixed": ["--mixup", "0", "--cutmix", "0"], "mixed": [],
                       "mixed again": [], "other seed": ["--seed", "1"]}.items():
        runs[name] = record_training_batches(monkeypatch, [*flags, *argv, "--out", str(tmp_path / name)])
    # Per image, per step, per chunk and per epoch: no two augmented images of the run are alike.
    images = torch.cat([x for x, _ in runs["unmixed"]])                    # (8 steps * 16, 3, 32, 32)
    assert len(images) == 128
    flat = images.flatten(1)
    assert len(torch.unique(flat, dim=0)) == 128
    # Per step: one MixUp/CutMix draw for the whole batch, a new one at every step.
    lambdas = []
    for _, targets in runs["mixed"]:
        shares = targets.max(1).values[targets.max(1).values < 1]       # max(lambda, 1 - lambda) of
        assert len(shares) > 8 and torch.allclose(shares, shares[0])     # each row of two classes
        lambdas.append(round(shares[0].item(), 6))
    assert len(set(lambdas)) == len(lambdas) == 8, lambdas
    # The same seed repeats every draw; another seed changes them.
    for (x, t), (x_again, t_again) in zip(runs["mixed"], runs["mixed again"]):
        assert torch.equal(x, x_again) and torch.equal(t, t_again)
    assert not any(torch.equal(x, x_other) for (x, _), (x_other, _) in zip(runs["mixed"], runs["other seed"]))


def test_evaluation_runs_in_eval_mode_and_leaves_the_model_training():
    import train_cifar
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.BatchNorm1d(10))
    model[2].running_mean.uniform_(-3, 3)                  # statistics far from any batch's
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        labels = model.eval()((images.float() / 255 - mean) / std).argmax(1)
    model.train()
    assert train_cifar.evaluate(model, images, labels, torch.device("cpu"), None) == [100.0]
    assert model.training


def test_evaluation_on_a_cpu_takes_batches_of_20_and_every_image_once_in_order():
    # Batches of 100 made the CPU evaluation of ConvMixer-256/8 p1 1.8x slower (its layers' outputs
    # fresh memory from the OS); of 1,000, ConvMixer-256/8 p2 3x slower.
    import train_cifar
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    images = torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8)
    logits = train_cifar.predict(model, images, torch.device("cpu"), None)
    assert seen == [20] * 12 + [10] and logits.shape == (250, 10) and logits.dtype == torch.float32
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((images.float() / 255 - mean) / std)
    torch.testing.assert_close(logits, expected)                        # each image's own logits
    seen.clear()
    train_cifar.predict(model, images, torch.device("cpu"), None, batch_size=1000)
    assert seen == [250]


def test_flip_tta_adds_the_logits_of_the_horizontal_mirror():
    import train_cifar
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        plain, mirrored, upside_down = model(x), model(x.flip(3)), model(x.flip(2))
    labels = (plain + mirrored).argmax(1)
    labels[:100] = (plain + upside_down).argmax(1)[:100]     # half of them: what a vertical flip says
    expected = 100.0 * ((plain + mirrored).argmax(1) == labels).float().mean().item()
    accuracy, flip_tta = train_cifar.evaluate(model, images, labels, torch.device("cpu"), None, flip_tta=True)
    assert flip_tta == pytest.approx(expected) and flip_tta < 100
    assert accuracy == pytest.approx(100.0 * (plain.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("mixer", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets_alike(mixer):
    import train_cifar
    other = "cutmix" if mixer == "mixup" else "mixup"
    recipe = train_cifar.parse_args(["--device", "cpu", f"--{other}", "0"])
    mix = train_cifar.batch_mixing(recipe)
    values = torch.arange(10).float() * 10                 # image i is filled with 10 * i
    images = values.view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    mixed, targets = mix(images, torch.arange(10))         # label i for image i
    assert targets.shape == (10, 10) and torch.allclose(targets.sum(1), torch.ones(10))
    assert (targets.max(1).values < 0.999).all()           # every image is mixed with another
    torch.testing.assert_close(mixed.mean((1, 2, 3)), targets @ values, atol=1e-3, rtol=1e-4)
    distinct_values = [len(torch.unique(m)) for m in mixed]
    assert all(n == (1 if mixer == "mixup" else 2) for n in distinct_values), distinct_values
    torch.manual_seed(0)
    alphas = [float(mix(images, torch.arange(10))[1].max(1).values[0]) for _ in range(200)]
    # alpha 0.5: the larger share is spread over (0.5, 1), mean about 0.82 (Beta(0.5, 0.5))
    assert 0.75 < sum(alphas) / len(alphas) < 0.9
