"""train_cifar.train_step without its per-step host sync, and optionally captured in a CUDA graph.

train_step reads the loss back after every forward pass, so that a non-finite loss stops the run
before the weights are updated. That read waits for the GPU: the CPU cannot queue the next step's
kernels while the GPU works on this one, which costs most at the paper's batch of 64, where a step
is short. DeviceStep keeps everything the trainer needs on the device:

- the epoch's running sums (loss x images, correct predictions) are float64 device tensors, added
  to in the same order and precision as train_cifar's Python floats, read when a line is printed
  or last.pt is written;
- a non-finite loss sets `found_inf`, which the fused AdamW kernel honours by skipping its update
  (the mechanism torch.amp.GradScaler uses), and it stays set, so the weights stay those before the
  first bad step; `first_bad_step` records where it happened, and the trainer reads it every
  train_cifar.CHECK_EVERY steps (and before every save) and stops there;
- with graph=True (CUDA), forward, loss, backward, clipping and AdamW are captured once into one
  CUDA graph and replayed every step: a few hundred kernel launches become one. Its inputs are
  copied into static buffers, and the learning rate is a device tensor.

On a CPU it runs eagerly, and test_convmixer.py checks it against train_step, weights and sums
bit for bit, and the skip. The graph's tests need a GPU (tools/gpu_check.sh tests); they passed on
an NVIDIA H200 (results/gpu_tests_cuda_only.txt, results/graph_resume_test.txt). There the 200-epoch
run's graph pieces trained at 6,346-6,472 img/s at batch 64, its host-step pieces at 2,334-2,433
(results/cifar10_convmixer_256_8_k9_p1), so the graph is --fast's default step on CUDA (but for
--compile, untested in a graph); "device" stays opt-in, untimed.
"""
import torch
from torch import nn

from trainer.housekeeping import Fail


def make_device_step(run, graph):
    """The DeviceStep of a train_cifar Run. For a graph the optimizer is made capturable, with its
    learning rate a device tensor; done once last.pt's optimizer state is loaded, which resets both,
    and "fused" too (a run that took --step-mode host on a CPU, where AdamW is not fused, then
    continues with --resume --step-mode device)."""
    if run.device.type != "cuda" and graph:
        raise Fail(f"this run's --step-mode is graph, which needs a CUDA device, not {run.device}; "
                   f"continue it here with --resume --step-mode device")
    for group in run.optimizer.param_groups:
        group["fused"] = True
    if graph:
        lr = torch.tensor(float(run.optimizer.param_groups[0]["lr"]), device=run.device)
        for group in run.optimizer.param_groups:
            group["capturable"], group["lr"] = True, lr
    return DeviceStep(run.net, run.optimizer, run.criterion, run.amp, run.recipe.clip, run.device, graph)


class DeviceStep:
    """One AdamW step of train_cifar's recipe, with the bookkeeping on the device. The optimizer must
    be fused (and, for graph=True, capturable, with a tensor learning rate: make_optimizer does it)."""

    def __init__(self, net, optimizer, criterion, amp, clip, device, graph=False):
        if not all(group["fused"] for group in optimizer.param_groups):
            raise ValueError("DeviceStep needs a fused AdamW (its kernel is what skips a bad step)")
        self.net, self.optimizer, self.criterion, self.amp, self.clip = net, optimizer, criterion, amp, clip
        self.graph, self.captured = graph, None
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss_sum, self.correct_sum = zero(torch.float64), zero(torch.float64)
        self.found_inf = zero(torch.float32)        # 1.0 once a loss was not finite: AdamW skips
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps_done = zero(torch.int64)         # the run's step counter, on the device
        optimizer.found_inf, optimizer.grad_scale = self.found_inf, None
        self.lr = optimizer.param_groups[0]["lr"]
        if graph and not isinstance(self.lr, torch.Tensor):
            raise ValueError("DeviceStep(graph=True) needs the optimizer's lr as a device tensor")

    def start(self, steps_done, loss_sum, correct_sum):
        """Where the run stands: its step count and the epoch's sums so far (as train_cifar keeps them)."""
        self.steps_done.fill_(steps_done)
        self.loss_sum.fill_(loss_sum)
        self.correct_sum.fill_(correct_sum)

    def read(self):
        """(loss x images, correct) of the epoch so far, as Python floats, and the run's step count
        (from 1) at the first non-finite loss, or None: one host sync."""
        loss_sum, correct_sum, first_bad = torch.stack([self.loss_sum, self.correct_sum,
                                                        self.first_bad_step.double()]).tolist()
        return loss_sum, correct_sum, int(first_bad) if first_bad >= 0 else None

    def __call__(self, images, targets, lr):
        """One step on (B, 3, H, W) images and (B, classes) targets at learning rate lr; returns the
        loss as a device tensor (reading it is a host sync)."""
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)                    # no sync: a fill with a host scalar
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if not self.graph:
            return self.body(images, targets)
        if self.captured is None:
            self.capture(images, targets)
        self.static_images.copy_(images)
        self.static_targets.copy_(targets)
        self.captured.replay()
        return self.static_loss

    def body(self, images, targets):
        """What one step does, all of it on the device (and so capturable)."""
        # Under a graph, autocast's cache of cast weights is off: PyTorch's notes on
        # make_graphed_callables ask it of autocast in a capture.
        with torch.autocast(images.device.type, self.amp, enabled=self.amp is not None,
                            cache_enabled=not self.graph):
            logits = self.net(images)
        loss = self.criterion(logits.float(), targets)
        finite = torch.isfinite(loss)
        self.steps_done.add_(1)
        self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & ~finite, self.steps_done,
                                              self.first_bad_step))
        self.found_inf.copy_(torch.maximum(self.found_inf, (~finite).float()))   # and it stays
        # The same float64 arithmetic as train_cifar's sums; from the first bad step on, nothing.
        n, good = images.shape[0], self.found_inf == 0
        correct = (logits.argmax(1) == targets.argmax(1)).sum().double()
        self.loss_sum.add_(torch.where(good, loss.detach().double() * n, 0.0))
        self.correct_sum.add_(torch.where(good, correct, 0.0))
        self.optimizer.zero_grad(set_to_none=not self.graph)
        loss.backward()
        if self.clip > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.optimizer.step()
        return loss.detach()

    def capture(self, images, targets):
        """Record body() into a CUDA graph. The warm-up steps it needs first (on a side stream, as
        torch.cuda.graphs requires) change the weights, so everything they touch is put back."""
        self.static_images, self.static_targets = images.clone(), targets.clone()
        tensors = [*self.net.state_dict().values(), self.loss_sum, self.correct_sum, self.found_inf,
                   self.first_bad_step, self.steps_done]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
        saved = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.body(self.static_images, self.static_targets)
        torch.cuda.current_stream().wait_stream(side)
        # The optimizer's state exists now (AdamW makes it at its first step): what is new is reset.
        new = [t for state in self.optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and not any(t is s for s in tensors)]
        self.captured = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.captured):
            self.static_loss = self.body(self.static_images, self.static_targets)
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
            for t in new:                        # a state made by the warm-up: as before any step
                t.zero_()
