"""The tutorial's comparisons at full scale: ConvMixer-256/8 (k5, p2) with each change of the
notebook's section 7, kernels 3 and 9, patches 1 and 4 (at width 256, unlike the notebook's
matched-FLOPs models), a ViT and an MLP-Mixer of about its size, each trained by train_cifar.py's
short recipe (25 epochs) from 3 seeds, into results/tutorial_variants/. Meant for a GPU.

    python tools/variants.py --data data --minutes 9      # one piece; run it again to go on

The models are the notebook's own: its cells tagged "models" are run here. Each run is a
train_cifar.py output folder, NAME_seedS/, of which a finished one keeps only its log.jsonl;
summary.json, which the notebook reads, is rewritten after every finished run. A piece starts no
run that its slowest run so far says would not end before the deadline; a run still going then gets
SIGTERM (train_cifar.py keeps the epochs it finished) and the next piece resumes it. Each run takes
the trainer's path for the GPU (--fast on an H100/H200, its kernels checked against nn.Conv2d
first), except the ViT and the MLP-Mixer: they have no depthwise convolution for the kernels and
take the plain path, whose augmentation is tested to sample what the fast path's does. Arguments
after -- go to train_cifar.py as they are (the tests run tiny versions on a CPU with them).
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_cifar  # noqa: E402
from convmixer import ConvMixer, Residual  # noqa: E402
from housekeeping import save_atomic  # noqa: E402

# name -> the model of a train_cifar config (its hdim, depth, psize); the notebook's variant() names
CHANGES = ["none (paper)", "BatchNorm -> LayerNorm", "BatchNorm before GELU", "GELU -> ReLU", "no residual",
           "residual around the whole block", "4x MLP channel mixing", "kernel 5 -> 3", "kernel 5 -> 9"]
PATCHES = {"patch 2 -> 1": 1, "patch 2 -> 4": 4}          # train_cifar's --psize for these two
CONTENDERS = {"ViT (dim 80, depth 8, p2)": lambda models: models["ViT"](80, 8, heads=4, patch=2),
              "MLP-Mixer (dim 64, depth 8, p2)": lambda models: models["MLPMixer"](64, 8, patch=2, token_hidden=80)}
NAMES = CHANGES + list(PATCHES) + list(CONTENDERS)
FOLDER = {name: re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") for name in NAMES}   # none_paper, ...


def notebook_models():
    """The classes and functions that tutorial.ipynb's cells tagged "models" define."""
    namespace = {"torch": torch, "nn": nn, "ConvMixer": ConvMixer, "Residual": Residual}
    for cell in json.loads((ROOT / "tutorial.ipynb").read_text())["cells"]:
        if "models" in cell["metadata"].get("tags", []):
            exec("".join(cell["source"]), namespace)
    return namespace


def model_for(name, config, models):
    if name in CONTENDERS:
        return CONTENDERS[name](models)
    if config["ksize"] != 5:
        raise SystemExit(f"variants.py: the kernel changes start from k5, got --ksize {config['ksize']}")
    change = name if name in CHANGES else "none (paper)"
    return models["variant"](change, config["hdim"], config["depth"], config["psize"])


def train_one(name, argv):
    """In the child process: train_cifar.py, with its model built as `name` says."""
    models = notebook_models()
    train_cifar.build_model = lambda config: model_for(name, config, models)
    train_cifar.main(argv)


def final_accuracy(run):
    last = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    return last["test_acc"] if last.get("final") else None


def finished(run):
    """Whether the run has its final record. A finished run keeps only its log: the weights and AdamW
    states of all the runs would take hundreds of MB."""
    if not (run / "log.jsonl").exists() or final_accuracy(run) is None:
        return False
    for weights in ("last.pt", "model.pt"):
        (run / weights).unlink(missing_ok=True)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "tutorial_variants")
    p.add_argument("--data", default="data", help="CIFAR-10 root")
    p.add_argument("--minutes", type=float, default=9.0, help="this piece's length: no run starts that would not end in it")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=NAMES, default=NAMES, metavar="NAME", help="these variants")
    p.add_argument("--one", choices=NAMES, help=argparse.SUPPRESS)      # the child: train this variant
    args, train_args = p.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    if args.one:
        return train_one(args.one, train_args)
    deadline, longest = time.monotonic() + 60 * args.minutes, 0.0   # longest: this piece's slowest run, s
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        for seed in args.seeds:
            run = args.out / f"{FOLDER[name]}_seed{seed}"
            if finished(run):
                continue
            resume = (run / "last.pt").exists()
            command = ["--resume", "--out", str(run), "--data", args.data] if resume else \
                ["--recipe", "short", "--seed", str(seed), "--out", str(run), "--data", args.data,
                 *(["--psize", str(PATCHES[name])] if name in PATCHES else []), *train_args]
            if deadline - time.monotonic() < longest:          # it would be cut: leave it to the next piece
                print(f"stopped before {run.name}, which would not finish in the time left; "
                      f"run this command again to go on")
                return 0
            print(f"{'resuming' if resume else 'starting'} {run.name}", flush=True)
            started = time.monotonic()
            child = subprocess.Popen([sys.executable, __file__, "--one", name, "--", *command])
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGTERM)               # train_cifar.py keeps its finished epochs
                child.wait()
                print(f"stopped at the deadline; run this command again to continue {run.name}")
                return 0
            if child.returncode:
                return child.returncode
            longest = max(longest, time.monotonic() - started)
            finished(run)
            write_summary(args.out)
    write_summary(args.out)
    print(f"all runs done: {args.out / 'summary.json'}")
    return 0


def write_summary(out):
    """summary.json: the final-epoch test accuracy of every finished run, by variant and seed; under
    final_test_acc, those of each variant with 3 seeds finished, as the notebook reads them."""
    runs = {}
    for name in NAMES:
        for log in sorted(out.glob(f"{FOLDER[name]}_seed*/log.jsonl")):
            accuracy = final_accuracy(log.parent)
            if accuracy is not None:
                runs.setdefault(name, {})[int(log.parent.name.rsplit("_seed", 1)[1])] = accuracy
    summary = {"recipe": "train_cifar.py --recipe short", "runs": runs,
               "final_test_acc": {name: [by_seed[s] for s in sorted(by_seed)]
                                  for name, by_seed in runs.items() if len(by_seed) >= 3}}
    save_atomic(json.dumps(summary, indent=1), out / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
