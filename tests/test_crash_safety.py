"""A run survives a kill at any instant, a full disk and damaged files (trainer/files.py). As storage
systems are tested: kill the process at random instants and inside its writes, resume each time,
and compare the end with an uninterrupted run's, tensor for tensor.
"""
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from helpers import (DATA, KILLABLE, ROOT, assert_same_run, error_lines_of_main, finish, finished,
                     read_log, run_script, start_or_resume, without_timings)

pytestmark = pytest.mark.slow          # each test runs and kills training runs


def test_sigkill_at_random_instants_never_loses_the_run(killable_reference, tmp_path):
    """SIGKILL at instants drawn at random over a run that writes last.pt after every step (so many
    kills land inside a save), --resume after each, until the run ends (runs are repeated until 8
    kills have landed): each ends as the uninterrupted run did, exactly.
    CONVMIXER_KILL_SEED=<seed> replays a failure's instants."""
    import random
    reference, (start_seconds, train_seconds) = killable_reference
    seed = int(os.environ.get("CONVMIXER_KILL_SEED", random.randrange(10**6)))
    rng, kills, resumes = random.Random(seed), 0, []
    for run in range(8):
        out = tmp_path / f"run{run}"
        while not finished(out) and kills < 8:
            done, proc = 0.0, start_or_resume(out)
            if (out / "last.pt").exists():
                state = torch.load(out / "last.pt", weights_only=True)
                done = (state["epoch"] * 10 + state["step"]) / 30
            # Every other kill: an instant of this process's life (its start, the training left, the
            # final evaluation); the others in its training, which the 5 s start would otherwise
            # outweigh, so that some resumes are sure to begin mid-epoch.
            if kills % 2:
                for line in proc.stdout:                 # until "ConvMixer-...": training begins
                    if line.startswith("ConvMixer-"):
                        break
                time.sleep(rng.uniform(0, train_seconds * (1 - done)))
            else:
                time.sleep(rng.uniform(0, start_seconds + train_seconds * (1 - done)))
            if proc.poll() is not None:                  # it ended before this kill
                stdout, stderr = proc.communicate()
                assert proc.returncode == 0, (seed, stdout + stderr)
                break
            proc.kill()
            proc.communicate()
            kills += 1
        if not finished(out):
            finish(out)
        assert_same_run(out, reference)
        resumes += [r for r in read_log(out) if r.get("resumed")]
        if kills == 8:
            break
    assert kills == 8 and any(r["step"] > 0 for r in resumes), f"seed {seed}: no resume mid-epoch"


def test_sigkill_inside_each_kind_of_write_resumes_exactly(killable_reference, tmp_path):
    """One run killed inside its writes, one kind after another (each process counts its own
    writes), resumed after each kill: the end is the uninterrupted run's."""
    reference, _ = killable_reference
    out, said = tmp_path / "run", []
    for kind, n, where in [
            ("checkpoint", 1, "halfway through the log's first line (its .tmp)"),
            ("rename", 2, "between writing the first last.pt and renaming it"),
            ("checkpoint", 17, "halfway through a last.pt in epoch 2 (after a restart from the log)"),
            ("log", 2, "halfway through the epoch 2 line"),
            ("model", 0, "halfway through model.pt"),
            ("log", 2, "halfway through the final line"),
            ("rename", 2, "between writing model.pt and renaming it")]:
        proc = start_or_resume(out, killer=[kind, n])
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (where, stdout + stderr)
        said.append(stderr)
    said.append(finish(out)[1])
    assert sum("cut short by a kill or a full disk; dropped" in text for text in said) == 2   # once each
    assert_same_run(out, reference)


def test_a_run_with_the_device_step_resumes_exactly(tmp_path):
    """--step-mode device keeps the epoch's sums on the device: killed mid-epoch between two saves
    (and its sums read back before each), resumed, it ends as its uninterrupted twin did."""
    device_run = [*KILLABLE, "--step-mode", "device"]
    run_script(*device_run, "--out", tmp_path / "reference")
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 15], new_run=device_run).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and stopped["recipe"]["step_mode"] == "device"
    finish(out)
    assert_same_run(out, tmp_path / "reference")


def test_a_float16_run_keeps_its_loss_scale_and_resumes_exactly(tmp_path):
    """--amp-dtype float16 (as older GPUs train, here on a CPU): the loss scaler's state is saved in
    last.pt and restored, so that a run killed mid-epoch and resumed ends as its uninterrupted twin;
    the first line and the log say the precision."""
    float16_run = [*KILLABLE, "--amp-dtype", "float16"]
    result = run_script(*float16_run, "--out", tmp_path / "reference")
    assert "float16 autocast with loss scaling" in result.stdout.splitlines()[0]
    assert read_log(tmp_path / "reference")[0]["config"]["amp_dtype"] == "float16"
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 15], new_run=float16_run).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and stopped["scaler"]["scale"] > 0
    finish(out)
    assert_same_run(out, tmp_path / "reference")
    scales = [torch.load(d / "last.pt", weights_only=True)["scaler"] for d in (out, tmp_path / "reference")]
    assert scales[0] == scales[1]


def test_resume_takes_a_new_step_mode_and_refuses_any_other_change_of_recipe(killable_reference, tmp_path,
                                                                           capsys):
    """The step mode says how a step runs, not what it computes, so that a long run can take a mode
    once it is tested; any other recipe flag given to --resume must be the run's own (the original
    command's flags are), since a resumed run keeps its recipe: ignoring the flag would be silent.
    tools/run_pieces.py then tells the pieces apart."""
    out = tmp_path / "run"
    start_or_resume(out, killer=["rename", 15]).communicate(timeout=300)
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and stopped["recipe"]["step_mode"] == "host"
    log_before = (out / "log.jsonl").read_bytes()
    for change, words in [(["--epochs", "5"], "--epochs is given as 5 and the run has 3"),
                          (["--seed", "4"], "--seed is given as 4 and the run has 3"),
                          (["--lr", "0.5"], "--lr is given as 0.5 and the run has 0.01"),
                          (["--fast"], "--fast is given as True and the run has False")]:
        lines = error_lines_of_main(["--resume", "--out", out, "--device", "cpu", *change], capsys)
        assert words in lines[-1] and "start a new run in another --out" in lines[-1], (change, lines)
    assert (out / "log.jsonl").read_bytes() == log_before

    import train_cifar, trainer.files as files
    for flags, taken in [([], {"step_mode": "host", "compile": False, "fused_norm": False}),
                         (["--amp-dtype", "float16"], {"amp_dtype": "float16"}), (["--no-amp"], {"amp": False}),
                         (["--compile", "--step-mode", "device"], {"step_mode": "device", "compile": True}),
                         (["--fused-norm"], {"fused_norm": True})]:
        args = train_cifar.parse_args(["--resume", "--out", str(out), "--device", "cpu", *flags])
        recipe = files.read_resume_state(out, train_cifar.RECIPE_KEYS, args)["recipe"]
        assert recipe == {**stopped["recipe"], **taken}

    graph = tmp_path / "graph"                          # a run of CUDA graphs, continued on a CPU
    shutil.copytree(out, graph)
    torch.save({**stopped, "recipe": {**stopped["recipe"], "step_mode": "graph"}}, graph / "last.pt")
    lines = error_lines_of_main(["--resume", "--out", graph, "--device", "cpu"], capsys)
    assert "needs a CUDA device" in lines[-1] and "--resume --step-mode device" in lines[-1]

    result = run_script("--resume", "--out", out, *KILLABLE, "--step-mode", "device")
    assert "resuming with --step-mode device (it was host)" in result.stdout
    resumes = [r for r in read_log(out) if r.get("resumed")]
    assert [(r["epoch"], r["step"], r["step_mode"]) for r in resumes] == [(2, 1, "device")]
    assert torch.load(out / "last.pt", weights_only=True)["recipe"]["step_mode"] == "device"
    # tools/run_pieces.py: the table of the run's pieces, for the run in progress and the finished one.
    spec = importlib.util.spec_from_file_location("run_pieces", ROOT / "tools" / "run_pieces.py")
    run_pieces = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_pieces)
    with pytest.raises(Exception, match="no log.jsonl there; give the folder of a train_cifar.py run"):
        run_pieces.pieces(tmp_path)
    summary, rows = run_pieces.pieces(graph)
    assert "3 epochs, in progress; 1 piece," in summary
    assert [(r["from"], r["to"], r["step mode"]) for r in rows] == [("epoch 1, step 0", "epoch 2, step 1", "host")]
    summary, rows = run_pieces.pieces(out)
    assert [(r["from"], r["to"], r["step mode"]) for r in rows] == [
        ("epoch 1, step 0", "epoch 2, step 1", "host"), ("epoch 2, step 1", "end of epoch 3", "device")]
    total = read_log(out)[-1]["wall_seconds"]
    assert f"complete; 2 pieces, {run_pieces.format_seconds(total)} of training in all" in summary
    assert resumes[0]["wall_seconds_before"] == stopped["wall_seconds"] < total
    assert {r["torch"] for r in rows} == {torch.__version__} and all(r["time"] != "?" for r in rows)
    commit = read_log(out)[0]["code"]
    assert rows[0]["commit"] == (commit["commit"][:7] + " + changes" * bool(commit["dirty"])
                                 + " (named)" * bool(commit.get("from")) if commit else "unknown")
    assert run_pieces.markdown(rows).splitlines()[0] == \
        "| piece | from | to | time | img/s | device | commit | step mode | torch |"
    config = read_log(out)[0]["config"]           # img/s: the piece's images per second of its time
    b, steps_per_epoch = config["batch_size"], config["n_train"] // config["batch_size"]
    before = resumes[0]["wall_seconds_before"]
    assert [r["img/s"] for r in rows] == [f"{(steps_per_epoch + 1) * b / before:,.0f}",
                                          f"{(2 * steps_per_epoch - 1) * b / (total - before):,.0f}"]
    assert run_pieces.pieces(graph)[1][0]["img/s"] == f"{(steps_per_epoch + 1) * b / stopped['wall_seconds']:,.0f}"

    # The same update: on CUDA every mode runs the same fused AdamW kernel; on a CPU the host mode's
    # AdamW is not fused, so the switched run ends as the host run did up to float rounding.
    switched, reference = (without_timings(read_log(d)) for d in (out, killable_reference[0]))
    losses = [[r.pop("train_loss", None) for r in log] for log in (switched, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert switched == reference
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (out, killable_reference[0]))
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in b)


def test_a_torn_last_log_line_is_dropped_on_resume(reference_run, tmp_path):
    """The case a full disk leaves: log.jsonl ends in half a line; last.pt is intact."""
    out = tmp_path / "torn"
    shutil.copytree(reference_run[0], out)
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "model.pt").unlink()
    (out / "log.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])   # the final line, torn
    result = run_script("--resume", "--out", out, "--workers", "0", *DATA)
    assert [line for line in result.stderr.splitlines() if "cut short" in line] == \
        [f"{out / 'log.jsonl'}: its last line (40 bytes) was cut short by a kill or a full disk; dropped"]
    assert without_timings(read_log(out)) == without_timings(read_log(reference_run[0]))
    finished, again = (torch.load(d / "model.pt", weights_only=True)["state_dict"]
                       for d in (reference_run[0], out))
    assert all(torch.equal(again[k], v) for k, v in finished.items())


def test_damaged_files_get_one_line_each(killable_reference, tmp_path, capsys, keep_signal_handlers):
    """Run in this process (train_cifar.main), to spare a start per case."""
    import train_cifar
    reference, _ = killable_reference
    cases = []

    def damaged(name, damage):
        out = tmp_path / name
        shutil.copytree(reference, out)
        (out / "model.pt").unlink()                                  # not finished: resumable
        log = read_log(out)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[:-1]))
        damage(out)
        return out

    truncated = damaged("truncated",
                        lambda o: (o / "last.pt").write_bytes((o / "last.pt").read_bytes()[:3000]))
    cases.append((["--resume", "--out", truncated], f"--resume {truncated / 'last.pt'}: cannot read it"))
    model_as_last = damaged("model_as_last", lambda o: shutil.copy(reference / "model.pt", o / "last.pt"))
    cases.append((["--resume", "--out", model_as_last], "a model file, not a run's last.pt"))
    foreign = damaged("foreign", lambda o: torch.save({"weights": torch.zeros(3)}, o / "last.pt"))
    cases.append((["--resume", "--out", foreign], "not a checkpoint written by train_cifar.py"))
    middle = damaged("middle", lambda o: (o / "log.jsonl").write_text(
        (o / "log.jsonl").read_text().replace('{"epoch": 1,', '{"epoch": 1', 1)))
    cases.append((["--resume", "--out", middle], f"{middle / 'log.jsonl'}, line 2: damaged"))
    gone = damaged("gone", lambda o: (o / "last.pt").unlink())
    cases.append((["--resume", "--out", gone], "training had begun; there is no state to continue from"))
    cut_model = tmp_path / "cut_model.pt"
    cut_model.write_bytes((reference / "model.pt").read_bytes()[:2000])
    cases.append((["--eval", cut_model, "--fake-data", "100"], f"--eval {cut_model}: cannot read it"))
    for argv, expected in cases:
        with pytest.raises(SystemExit) as e:
            train_cifar.main([*map(str, argv), "--device", "cpu", "--workers", "0"])
        error = str(e.value.code)
        assert error.startswith("train_cifar.py: error: ") and "\n" not in error and expected in error, argv
        assert not capsys.readouterr().err, argv                       # that line and nothing else

    stray = damaged("stray_tmp", lambda o: (o / "last.pt.tmp").write_bytes(b"half a checkpoint"))
    train_cifar.main(["--resume", "--out", str(stray), "--workers", "0", "--device", "cpu"])
    assert_same_run(stray, reference)
    # A kill before anything was written leaves at most a .tmp: the first command works again.
    early = tmp_path / "early"
    early.mkdir()
    (early / "log.jsonl.tmp").write_text('{"config": {"hd')
    train_cifar.main([*KILLABLE, "--out", str(early)])
    assert_same_run(early, reference)


class FullDisk:
    """Makes the n-th write of one kind fail as a full disk does: part of the bytes are written,
    then OSError(ENOSPC). kind: "checkpoint" (write_atomic's file) or "log" (a log line)."""

    def __init__(self, monkeypatch, kind, n):
        import builtins
        import types
        import trainer.files as files
        self.calls, real_open, real_os = 0, builtins.open, files.os

        def fail_now():
            self.calls += 1
            return self.calls == n

        class FillingFile:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if fail_now():
                    self.f.write(data[:len(data) // 3])
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        def limited_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FillingFile(f) if kind == "checkpoint" and "w" in mode else f

        def limited_write(fd, data):
            if fail_now():
                real_os.write(fd, bytes(data[:len(data) // 3]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_os.write(fd, data)

        monkeypatch.setattr(files, "open", limited_open, raising=False)
        if kind == "log":
            monkeypatch.setattr(files, "os",
                                types.SimpleNamespace(**{**vars(real_os), "write": limited_write}))


@pytest.mark.parametrize("kind,n", [("checkpoint", 7), ("log", 2)])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues_it(
        kind, n, killable_reference, tmp_path, monkeypatch, keep_signal_handlers):
    import train_cifar
    reference, _ = killable_reference
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        FullDisk(patch, kind, n)
        with pytest.raises(train_cifar.Fail) as e:
            train_cifar.train(train_cifar.parse_args([*KILLABLE, "--out", str(out), "--save-every", "0"]))
    message = str(e.value)
    assert "\n" not in message and "the disk is full" in message, message
    assert f"Free some space, then continue with: python train_cifar.py --resume --out {out}" in message
    saved = torch.load(out / "last.pt", weights_only=True)                    # intact
    assert f"last.pt holds epoch {saved['epoch'] + 1}, step {saved['step']}" in message
    assert not list(out.glob("*.tmp")) and read_log(out)                      # whole lines only
    train_cifar.main(["--resume", "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert_same_run(out, reference)


def test_a_real_full_disk_stops_the_run_and_resume_continues_once_there_is_room(killable_reference, tmp_path):
    """The same on a real filesystem: a 48 KiB tmpfs (needs the right to mount one, as root has)
    holds the log and one last.pt but not a second beside it; after the error it is made larger."""
    reference, _ = killable_reference
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = disk / "run"
        result = run_script(*KILLABLE, "--out", out, "--save-every", "0", check=False)
        error = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(error) == 1 and "the disk is full" in error[0], result.stderr
        saved = torch.load(out / "last.pt", weights_only=True)
        assert f"last.pt holds epoch {saved['epoch'] + 1}, step {saved['step']}" in error[0]
        assert not list(out.glob("*.tmp")) and read_log(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        run_script(*error[0].split("continue with: python train_cifar.py ")[1].split(), "--workers", "0",
                   "--device", "cpu")
        assert_same_run(out, reference)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_the_log_records_the_commit_at_each_start_and_resume(killable_reference, tmp_path,
                                                             keep_signal_handlers):
    import train_cifar
    reference, _ = killable_reference
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.pt").unlink()
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(out)[:-1]))
    train_cifar.main(["--resume", "--out", str(out), "--workers", "0", "--device", "cpu"])
    starts = [r for r in read_log(out) if "config" in r or r.get("resumed")]
    assert len(starts) == 2
    for record in starts:
        assert record["code"]["commit"] == head.stdout.strip() and isinstance(record["code"]["dirty"], bool)
        assert record["device"].startswith("cpu") and record["versions"]["torch"] == torch.__version__
        assert "triton" not in record["versions"]                  # recorded on CUDA only


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_dirty_for_changed_code_not_for_changed_results(tmp_path):
    from trainer.files import code_version
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",  # noqa: E731
                                        "-c", "user.email=t@t", *args], check=True, capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "trainer").mkdir()
    for name in ["train_cifar.py", "trainer/files.py", "results/log.jsonl", "README.md"]:
        (tmp_path / name).write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert code_version(tmp_path) == {"commit": head.stdout.strip(), "dirty": False}
    for name in ["results/log.jsonl", "README.md"]:      # a run's committed files go on; no code changed
        (tmp_path / name).write_text("y\n")
    (tmp_path / "notes.py").write_text("untracked\n")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "trainer/files.py").write_text("y\n")
    assert code_version(tmp_path)["dirty"] is True
    git("commit", "-qam", "d")
    (tmp_path / "train_cifar.py").unlink()
    assert code_version(tmp_path)["dirty"] is True
