"""The pieces of a train_cifar.py run that was stopped and continued (--resume), as a Markdown table:
where each piece began and ended, how long it trained and how fast, on which device, commit, step
mode and torch.

    python tools/run_pieces.py results/cifar10_convmixer_256_8_k9_p1

Everything comes from the run's log.jsonl (its first line and one line per resume) and, for a run
still in progress, its last.pt (where it stands). A piece's time is the run's wall time that last.pt
kept: what a hard kill cut off after the last save is not counted, since it was trained again. Its
img/s are the images it trained per second of that time, which also holds its start, compilation
and test evaluations (each epoch's line in log.jsonl has the speed of its training steps alone).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.files import read_log  # noqa: E402
from trainer.housekeeping import Fail, format_seconds  # noqa: E402


def describe_commit(code):
    if not code or not code.get("commit"):
        return "unknown"
    named = " (named)" if code.get("from") else ""                      # CONVMIXER_COMMIT
    return code["commit"][:7] + (" + changes" if code.get("dirty") else "") + named


def pieces(folder):
    """(summary line, rows): one row per piece, in order."""
    folder = Path(folder)
    if not (folder / "log.jsonl").is_file():
        raise Fail(f"{folder}: no log.jsonl there; give the folder of a train_cifar.py run")
    records = read_log(folder / "log.jsonl")
    if not records or "config" not in records[0]:
        raise Fail(f"{folder / 'log.jsonl'}: it does not begin with a run's recipe")
    config = records[0]["config"]
    starts = [{**records[0], "epoch": 1, "step": 0, "wall_seconds_before": 0.0,
               "step_mode": config.get("step_mode", "host"), "compile": config.get("compile", False)}]
    starts += [r for r in records if r.get("resumed")]
    final = next((r for r in records if r.get("final")), None)
    steps_per_epoch = config["n_train"] // config["batch_size"]
    if final:
        end, total = f"end of epoch {config['epochs']}", final.get("wall_seconds")
        end_step = config["epochs"] * steps_per_epoch
    elif (folder / "last.pt").is_file():
        state = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        end, total = f"epoch {state['epoch'] + 1}, step {state['step']}", state["wall_seconds"]
        end_step = state["epoch"] * steps_per_epoch + state["step"]
    else:
        end, total, end_step = "?", None, None
    rows = []
    for number, (start, after) in enumerate(zip(starts, starts[1:] + [None]), 1):
        until = after.get("wall_seconds_before") if after else total
        began = start.get("wall_seconds_before")
        seconds = until - began if until is not None and began is not None else None
        first = (start["epoch"] - 1) * steps_per_epoch + start["step"]        # steps done before it
        last = (after["epoch"] - 1) * steps_per_epoch + after["step"] if after else end_step
        speed = (last - first) * config["batch_size"] / seconds if seconds and last is not None else None
        rows.append({"piece": number, "from": f"epoch {start['epoch']}, step {start['step']}",
                     "to": f"epoch {after['epoch']}, step {after['step']}" if after else end,
                     "time": format_seconds(seconds) if seconds is not None else "?",
                     "img/s": f"{speed:,.0f}" if speed is not None else "?",
                     "device": start.get("device", "?"), "commit": describe_commit(start.get("code")),
                     "step mode": start.get("step_mode", "host") + (", compiled" if start.get("compile") else ""),
                     "torch": start.get("versions", {}).get("torch", "?")})
    state = "complete" if final else "in progress"
    summary = (f"{folder}: {config['epochs']} epochs, {state}; {len(rows)} piece{'s' * (len(rows) != 1)}, "
               f"{format_seconds(total) if total is not None else '?'} of training in all")
    return summary, rows


def markdown(rows):
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the folder of a train_cifar.py run (its log.jsonl)")
    args = p.parse_args(argv)
    try:
        summary, rows = pieces(args.run)
    except Fail as e:
        sys.exit(f"run_pieces.py: error: {e}")
    print(summary + "\n\n" + markdown(rows))


if __name__ == "__main__":
    main()
