"""The committed CIFAR-10 model's float32 CPU logits for the first N test images, saved next to it,
so that a test can check in seconds that loading and preprocessing still give the same predictions.

    python tools/reference_logits.py --data data       # -> results/cifar10_convmixer_256_8_k9_p1/test_logits.pt
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import convmixer  # noqa: E402
import train_cifar  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--data", default="data", help="CIFAR-10 root")
p.add_argument("--n", type=int, default=500, help="how many test images, from the first")
args = p.parse_args()
images, _ = train_cifar.load_data(train_cifar.parse_args(["--device", "cpu", "--data", args.data]), train=False)
logits = train_cifar.predict(convmixer.convmixer_cifar10(pretrained=True), images[:args.n], torch.device("cpu"), None)
out = ROOT / "results" / "cifar10_convmixer_256_8_k9_p1" / "test_logits.pt"
torch.save({"logits": logits, "n": args.n, "torch": str(torch.__version__)}, out)
print(f"wrote {out}: float32 CPU logits of the first {args.n} test images")
