"""A run survives what stops it: a SIGKILL at any instant (then --resume ends exactly as an
uninterrupted run), a kill inside a write, a full disk, Ctrl-C and SIGTERM (one line, the exit code,
how to go on), and a damaged last.pt. Nothing here depends on when a kill lands: only the result is
checked.
"""
import errno
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import housekeeping
from helpers import ROOT, SMALL, assert_same_run, error_lines_of_main, kill_after, read_log, run_main


def finish(out):
    """Resume the run in out (or start it, where nothing of it was saved) and let it end."""
    if (out / "log.jsonl").exists() and read_log(out)[-1].get("final"):
        return
    if (out / "last.pt").exists():
        run_main("--resume", "--out", out)
    else:
        run_main(*SMALL, "--out", out)


@pytest.mark.slow
def test_sigkill_at_seeded_instants_then_resume_ends_as_the_uninterrupted_run(small_reference, tmp_path):
    out, rng = tmp_path / "run", random.Random(675173)
    for _ in range(4):                     # instants from a second to a few: start-up, epochs, writes
        if (out / "log.jsonl").exists() and read_log(out)[-1].get("final"):
            break
        argv = ["--resume", "--out", out] if (out / "last.pt").exists() else [*SMALL, "--out", out]
        kill_after(rng.uniform(1.0, 6.0), *argv)
    finish(out)
    assert_same_run(out, small_reference)


@pytest.mark.slow
@pytest.mark.parametrize("name, how, n", [("last.pt", "torn", 1), ("last.pt", "unrenamed", 3),
                                          ("log.jsonl", "torn", 2), ("log.jsonl", "unrenamed", 4),
                                          ("model.pt", "torn", 1)])
def test_a_kill_inside_a_write_loses_nothing_and_resume_ends_as_the_uninterrupted_run(
        small_reference, tmp_path, name, how, n):
    out = tmp_path / "run"
    assert kill_after(120, *SMALL, "--out", out, killer=(name, how, n)) == -signal.SIGKILL
    finish(out)
    assert_same_run(out, small_reference)


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_keeps_the_last_pt_and_resume_continues(small_reference, tmp_path,
                                                                             monkeypatch, capsys):
    out, calls, fsync = tmp_path / "run", [0], os.fsync

    def full_at_the_fifth_write(fd):
        calls[0] += 1
        if calls[0] == 5:                  # the third last.pt: after epoch 1's last.pt and log
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(housekeeping.os, "fsync", full_at_the_fifth_write)
    error = error_lines_of_main([*SMALL, "--out", out], capsys)
    assert len(error) == 1 and "could not write" in error[0] and "No space left on device" in error[0], error
    assert "the last.pt there before is intact" in error[0] and error[0].endswith("last.pt holds epoch 1")
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1 and not list(out.glob("*.tmp"))
    monkeypatch.setattr(housekeeping.os, "fsync", fsync)
    run_main("--resume", "--out", out)
    assert_same_run(out, small_reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_sigterm_and_ctrl_c_stop_at_once_in_one_line_with_the_exit_code(tmp_path, signum, workers):
    """Sent to the run's whole process group, data workers included, as `timeout`, a terminal's
    Ctrl-C or a batch scheduler sends it, once the first epoch is saved."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_cifar.py"), *SMALL[:8], "--epochs", "500",
                             *SMALL[10:], "--workers", str(workers), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch   1/500"):
            break
    os.killpg(proc.pid, signum)
    _, stderr = proc.communicate(timeout=300)            # a run that goes on would time out
    assert proc.returncode == 128 + signum, stderr
    # The last line says it. (A signal that lands while a data worker is being forked can make
    # Python print an "Exception ignored" above it; the run stops all the same.)
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"{signal.Signals(signum).name}: stopped; {out}/last.pt holds epoch "), stderr
    assert line.endswith(f"continue with: python train_cifar.py --resume --out {out}")
    saved = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert f"holds epoch {saved};" in line and saved >= 1 and (workers or "Traceback" not in stderr), stderr


@pytest.mark.slow
def test_a_damaged_last_pt_is_one_line(small_reference, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((small_reference / "last.pt").read_bytes()[:5000])
    error = error_lines_of_main(["--resume", "--out", out], capsys)
    assert len(error) == 1 and f"--resume {out / 'last.pt'}: cannot read it as a checkpoint" in error[0], error


@pytest.mark.slow
def test_the_log_records_where_each_start_and_resume_ran(small_reference):
    log = read_log(small_reference)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert log[0]["commit"] == (commit or None) and log[0]["device"].startswith("cpu") and "torch" in log[0]
