"""The files of a train_cifar.py run, written so that a kill at any instant, a full disk or a power
cut loses at most the last few minutes of training and never the run.

    last.pt     where the run stands (weights, optimizer, epoch, step): --resume continues from it
    model.pt    the final weights and their config
    log.jsonl   the recipe and versions, a line per epoch, a line per resume, the result

How each survives damage:
- checkpoints are written whole to NAME.tmp, flushed to the disk, then renamed over NAME, so a kill
  leaves the old file or the new one, never a torn one (a stray .tmp is simply written over);
- the log is appended a line at a time, flushed each time; a kill or a full disk can tear only its
  last line, which --resume drops (last.pt is the authority on where the run stands) and which
  readers of a finished log skip;
- a write that fails (ENOSPC, ...) stops the run with one line (WriteFailed) that says what is
  intact and how to continue; the earlier files are untouched; a truncated or foreign checkpoint
  given to --resume or --eval is named in one line.

last.pt is written at the end of every epoch and every --save-every minutes within one, so that a
hard kill loses at most that much. The tests (tests/test_crash_safety.py) kill a small CPU run with
SIGKILL at 8 instants drawn at random and inside each kind of write, resume it each time and compare
the end with an uninterrupted run's, tensor for tensor; they fill a real 48 KiB filesystem (where
they may mount one) and inject ENOSPC into each kind of write.
"""
import contextlib
import errno
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from trainer.housekeeping import Fail, device_name, triton_runs_on

LOG = "log.jsonl"
# Recipe keys added after runs had been saved without them, and the value those runs ran with.
# (amp_dtype: runs begun before it was a flag autocast to bfloat16, on CUDA where they all ran)
ADDED_LATER = {"step_mode": "host", "fused_norm": False, "amp_dtype": "bfloat16"}
# Recipe keys that say how a step is run, not what it computes: the step mode (on CUDA every mode
# runs the same fused AdamW on the same numbers; fast/step.py), torch.compile, the fused GELU ->
# BatchNorm (the same model; their float rounding may differ, as on another GPU) and the precision.
# --resume may change them, so that a long run can take a faster way once it is tested, or go on
# on another GPU; a run keeps its own unless the flag is given.
CHANGEABLE_ON_RESUME = {"step_mode", "compile", "fused_norm", "amp", "amp_dtype"}


class WriteFailed(Fail):
    """A file of the run could not be written; the earlier version of it is intact."""


def write_atomic(data: bytes, path: Path):
    """Replace `path` by `data` so that a kill or power cut at any instant leaves one or the other."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())                  # the bytes are on the disk before the rename
        os.replace(tmp, path)
        fsync_folder(path.parent)                 # and so is the rename
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)           # frees the space it took
        except OSError:
            pass
        before = f"the {path.name} there before is intact" if path.exists() else "nothing was written"
        raise WriteFailed(f"could not write {path} ({describe(e)}); {before}") from None


def save_atomic(obj, path: Path):
    """torch.save(obj) or a str, written atomically. Serialized in memory first, so that a full
    disk shows up as an OSError of the write (torch.save's own writer reports a RuntimeError).
    Tensors are saved from the CPU, so that a file written on a GPU loads with a plain torch.load
    on a machine without one (torch.save records each tensor's device, and torch.load puts it back
    there)."""
    if isinstance(obj, str):
        data = obj.encode()
    else:
        buffer = io.BytesIO()
        torch.save(on_cpu(obj), buffer)
        data = buffer.getvalue()
    write_atomic(data, path)


def on_cpu(obj):
    """obj with every tensor in its dicts, lists and tuples copied to the CPU (a CPU tensor as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(value) for value in obj)
    return obj


def fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                                    # not possible everywhere; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe(e: OSError):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{e.strerror or 'no space left on device'}: the disk is full"
    return e.strerror or str(e)


def write_log(path: Path, record: dict):
    """Append one JSON line and flush it to the disk. A failed write is cut back off the file (where
    the disk allows), so that the log stays whole lines."""
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteFailed(f"could not write to {path} ({describe(e)})") from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise WriteFailed(f"could not write to {path} ({describe(e)}); "
                              f"its earlier lines are intact") from None
    finally:
        os.close(fd)


def read_log(path: Path, quiet=False):
    """The records of a log.jsonl. A last line cut short (by a kill, a full disk) is dropped with one
    line saying so; damage anywhere else is an error naming the file and line."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise Fail(f"cannot read {path} ({e.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise Fail(f"{path}, line {number}: damaged (not a JSON object); the lines after it are "
                           f"intact, so this is not a cut-short write: repair or remove that line") from None
            if not quiet:
                print(f"{path}: its last line ({len(line)} bytes) was cut short by a kill or a full "
                      f"disk; dropped", file=sys.stderr)
            continue
        records.append(record)
    return records


def code_version(checkout=None):
    """The git commit the code was run from, and whether its tracked Python files had uncommitted
    changes (a run's own files committed under results/, updated since, change no code). A copy
    that is not a checkout (copied to another machine, say) can name its commit in the environment
    variable CONVMIXER_COMMIT; else None."""
    here = Path(checkout or Path(__file__).resolve().parent.parent)

    def git(*args):
        result = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else None
    try:
        if git("ls-files", "--error-unmatch", "train_cifar.py") is not None:   # this project's checkout
            commit = git("rev-parse", "HEAD")
            changes = git("status", "--porcelain", "--untracked-files=no", "--", "*.py")
            if commit:
                return {"commit": commit, "dirty": bool(changes)}
    except (OSError, subprocess.SubprocessError):
        pass
    named = os.environ.get("CONVMIXER_COMMIT")
    return {"commit": named, "dirty": None, "from": "CONVMIXER_COMMIT"} if named else None


def where_it_ran(device):
    """What the log records at each start and resume: the device, the code and the library versions
    (on CUDA Triton's too: None where it is missing, and --fast keeps PyTorch's depthwise convs)."""
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version()}
    if device.type == "cuda":
        versions["triton"] = triton_version()
    return {"device": device_name(device), "code": code_version(), "versions": versions}


def triton_version():
    """Triton's version, or None where it cannot be imported: torch's Linux CUDA wheels install it,
    on Windows it is a package of its own. fast/depthwise.py's kernels need it."""
    try:
        import triton
    except ImportError:             # not installed, or broken (e.g. built for another torch)
        return None
    return triton.__version__


@contextlib.contextmanager
def after_a_failed_write(run):
    """Turn a WriteFailed during training into one line: what failed, what last.pt holds, how to go on."""
    try:
        yield
    except WriteFailed as e:
        kept = (f"last.pt holds epoch {run.saved[0] + 1}, step {run.saved[1]}" if run.saved
                else "no last.pt was written yet")
        raise Fail(f"{e}; {kept}. Free some space, then continue with: "
                   f"python train_cifar.py --resume --out {run.out}") from None


# ---------------------------------------------------------------------------------------------
# Starting and resuming

def read_checkpoint(path, flag):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise Fail(f"{flag} {path}: cannot read it as a checkpoint, it may be truncated or foreign "
                   f"({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise Fail(f"{flag} {path}: not a checkpoint written by train_cifar.py "
                   f"(needs 'state_dict' and 'config')")
    return ckpt


def read_model(path, flag, build_model, mean, std):
    """The model saved in a model.pt (or last.pt) of train_cifar.py, built from its config, after
    checking that the file is whole, describes a ConvMixer, and was trained with this normalization."""
    ckpt = read_checkpoint(path, flag)
    config = ckpt["config"]
    try:
        model = build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise Fail(f"{flag} {path}: its config does not describe a ConvMixer ({e})") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise Fail(f"{flag} {path}: its weights do not fit the model in its config "
                   f"({' '.join(str(e).strip().splitlines()[:2])[:300]})") from None
    if list(config.get("mean", mean)) != list(mean) or list(config.get("std", std)) != list(std):
        raise Fail(f"{flag} {path}: it was trained with another normalization than CIFAR-10's")
    return model


def read_resume_state(out: Path, recipe_keys, args=None):
    """Where the run in `out` stands: last.pt's contents, after checking that this version can
    continue it, with the recipe flags given to --resume (args.given) applied: those of
    CHANGEABLE_ON_RESUME are taken; any other must agree with the run's recipe, which a resumed run
    keeps (a flag that would train something else is an error, not silently ignored)."""
    state = stored_resume_state(out, recipe_keys)
    recipe = state["recipe"]
    changed = sorted(k for k in getattr(args, "given", ()) if k in recipe and getattr(args, k) != recipe[k])
    for key in changed:
        flag, value = "--" + key.replace("_", "-"), getattr(args, key)
        if key not in CHANGEABLE_ON_RESUME:
            raise Fail(f"--resume continues the run in {out} with its own recipe, but {flag} is given "
                       f"as {value!r} and the run has {recipe[key]!r}; drop the flag, or start a new "
                       f"run in another --out")
        print(f"resuming with {flag} {value} (it was {recipe[key]})")
        recipe[key] = value
    if recipe.get("fused_norm") and args is not None and not triton_runs_on(args.device):
        raise Fail(f"this run's recipe has --fused-norm, whose Triton kernels need a CUDA device, not "
                   f"{args.device}; continue it here with --resume --no-fused-norm")
    return state


def stored_resume_state(out: Path, recipe_keys):
    """last.pt's contents, checked. A run killed in the instant between its log's first line and its
    first last.pt (written before the first step) restarts from the recipe in its log, which is where
    it stood."""
    log = out / LOG
    if not log.exists():
        raise Fail(f"--resume: {log} does not exist, so {out} holds no run of train_cifar.py "
                   f"(one killed before it wrote anything: start it again without --resume)")
    records = read_log(log)
    header = records[0] if records and "config" in records[0] else None
    if (out / "last.pt").exists():
        state = read_checkpoint(out / "last.pt", "--resume")
        if "recipe" not in state:
            raise Fail(f"--resume {out / 'last.pt'}: a model file, not a run's last.pt")
    elif header and not any("train_loss" in r or r.get("final") or r.get("resumed") and
                            (r["epoch"], r["step"]) != (1, 0) for r in records):
        print(f"resuming {out} from its start: it was stopped before its first last.pt "
              f"(the recipe is taken from {LOG})")
        return {"recipe": header["config"], "eval_every": header.get("eval_every", 10), "epoch": 0, "step": 0,
                "wall_seconds": 0.0,
                "sums": {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}}
    else:
        raise Fail(f"--resume: {out / 'last.pt'} does not exist, though {log} shows that training "
                   f"had begun; there is no state to continue from" if header else
                   f"--resume: {out / 'last.pt'} does not exist and {log} does not begin with a recipe")
    state["recipe"] = {**{k: v for k, v in ADDED_LATER.items() if k in recipe_keys}, **state["recipe"]}
    missing = [k for k in recipe_keys if k not in state["recipe"]]
    if missing:
        raise Fail(f"--resume: {out / 'last.pt'} was written by an older train_cifar.py, whose "
                   f"recipe lacks {', '.join(missing)}; this version cannot continue it")
    epochs = state["recipe"]["epochs"]
    if state["epoch"] < epochs:
        print(f"resuming {out} at epoch {state['epoch'] + 1}, step {state['step']} "
              f"(the recipe is taken from last.pt)")
    elif any(r.get("final") for r in records):
        raise Fail(f"--resume: the run in {out} has already finished all its epochs")
    else:       # stopped between the last epoch and the final evaluation: do that now
        print(f"resuming {out}: all {epochs} epochs are done; final evaluation and model.pt")
    return state


def start_log(out: Path, recipe, device, n_params, eval_every, resume_state=None):
    """Create the run's folder and start log.jsonl with the recipe and where it runs; when resuming,
    cut the log back to where last.pt stands instead. One line of error if --out cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fail(f"--out {out}: cannot write there ({e.strerror}: {e.filename})") from None
    where = where_it_ran(device)
    try:
        if resume_state is None:          # whole or not at all: a resume needs its recipe
            header = {"config": recipe, "eval_every": eval_every, **where, "n_params": n_params,
                      "argv": sys.argv}
            write_atomic((json.dumps(header) + "\n").encode(), out / LOG)
        else:
            how = {k: recipe[k] for k in sorted(CHANGEABLE_ON_RESUME) if k in recipe}   # (as it resumes)
            rewrite_log_for_resume(out / LOG, resume_state["epoch"], resume_state["step"],
                                   {**where, **how, "wall_seconds_before": resume_state["wall_seconds"]})
            for stray in out.glob("*.tmp"):       # a write that a kill cut short: never read
                stray.unlink(missing_ok=True)
    except WriteFailed as e:
        raise Fail(f"--out {out}: cannot write there ({e})") from None
    return where


def rewrite_log_for_resume(path, epoch, step, where):
    """Drop what was logged after last.pt was written (a kill between the two writes, a torn last
    line), atomically, then record the resume: where it starts and on what it runs."""
    keep = [r for r in read_log(path, quiet=True)
            if not r.get("final") and not ("train_loss" in r and r["epoch"] > epoch)]
    write_atomic("".join(json.dumps(r) + "\n" for r in keep).encode(), path)
    write_log(path, {"resumed": True, "epoch": epoch + 1, "step": step, **where})
