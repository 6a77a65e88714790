"""The curves of train_cifar.py runs, from their log.jsonl, in one PNG: training loss per epoch,
test accuracy at each evaluation (every --eval-every epochs and after the last), learning rate.

    python tools/plot_run.py results/cifar10_convmixer_256_8_k9_p1 \
        --out results/cifar10_convmixer_256_8_k9_p1.png
    python tools/plot_run.py results/cifar10_256_8_k5_p2_* --out results/cifar10_256_8_k5_p2.png

Each run is labelled with its folder's name and its final-epoch test accuracy (the result; no
other epoch is singled out). A run still in progress is drawn as far as it got. Needs matplotlib
(requirements-dev.txt).
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                     # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402



class Fail(Exception):
    """A bad folder: one line, no traceback."""


def curves(folder):
    """(label, epochs, train loss, lr, [(epoch, test accuracy)]) of the run in `folder`."""
    log = Path(folder) / "log.jsonl"
    if not log.is_file():
        raise Fail(f"{folder}: no log.jsonl there; give the folder of a train_cifar.py run")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = {r["epoch"]: r for r in records if "train_loss" in r}       # a resume may log one again
    final = [r for r in records if r.get("final")]
    header = records[0].get("config", {}) if records else {}
    label = Path(folder).resolve().name
    if final:
        label += f": {final[-1]['test_acc']:.2f}% after {header.get('epochs', max(epochs))} epochs"
    elif epochs:
        label += f": in progress, {max(epochs)} of {header.get('epochs', '?')} epochs"
    xs = sorted(epochs)
    tests = [(x, epochs[x]["test_acc"]) for x in xs if "test_acc" in epochs[x]]
    return label, xs, [epochs[x]["train_loss"] for x in xs], [epochs[x]["lr"] for x in xs], tests


def plot(folders, out):
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for folder in folders:
        label, xs, loss, lr, tests = curves(folder)
        line, = loss_ax.plot(xs, loss, label=label)
        if tests:
            acc_ax.plot(*zip(*tests), marker="o", color=line.get_color(), label=label)
        lr_ax.plot(xs, lr, color=line.get_color(), label=label)
    for ax, title in [(loss_ax, "training loss (MixUp/CutMix targets, label smoothing)"),
                      (acc_ax, "test accuracy (%)"), (lr_ax, "learning rate (at each epoch's end)")]:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="folders of train_cifar.py runs (each with its log.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        plot(args.runs, args.out)
    except Fail as e:
        sys.exit(f"plot_run.py: error: {e}")


if __name__ == "__main__":
    main()
