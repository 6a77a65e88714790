"""--fast's model and training step on CUDA: the Triton depthwise kernels, checked on this GPU
before they are used, and train_cifar.train_step captured once as a CUDA graph.

At the paper's batch of 64 a step's arithmetic is short, and launching its few hundred kernels
from Python is most of it. A CUDA graph records forward, loss, backward, clipping and AdamW once
and replays them as one launch; its inputs are copied into static buffers, and the learning rate
is a device tensor that the capturable AdamW reads. The graph computes what train_step computes
(tests/test_fast.py checks the body against it on a CPU, the graph against the eager body on a
GPU); a non-finite loss shows in the epoch's loss sum, which train_cifar checks.
"""
import importlib.util

import torch
from torch import nn


def make_fast_step(model, optimizer, criterion, amp, args, device):
    """(step, None) on CUDA, with the Triton kernels swapped into `model` (same Parameters);
    (None, None) elsewhere, where train_cifar's readable step runs; (None, why) when this GPU cannot
    take the fast path, which train_cifar then leaves for the plain one."""
    if device.type != "cuda":
        return None, None
    if importlib.util.find_spec("triton") is None:
        return None, "plain path: Triton is not installed here, and --fast needs it"
    from fast.depthwise import check_against_conv2d, is_same_depthwise, use_fast_depthwise
    conv = next((m for m in model.modules() if is_same_depthwise(m)), None)
    if conv is None:                     # a ViT, say (tools/variants.py trains the tutorial's)
        return None, "plain path: the model has no depthwise convolution for the Triton kernels"
    side = 32 // args.psize
    problem = check_against_conv2d(conv, (args.batch_size, args.hdim, side, side), amp)
    if problem:
        return None, f"plain path: the Triton depthwise kernels disagree with nn.Conv2d on this GPU ({problem})"
    use_fast_depthwise(model)
    torch.cuda.set_device(device)        # the graph's streams and pool, for cuda:1 as for cuda:0
    return GraphStep(model, optimizer, criterion, amp, args.clip), None


class GraphStep:
    """train_cifar.train_step's arithmetic, replayed from a CUDA graph (graph=False: run eagerly,
    as the tests do on a CPU). Call it as train_step is called: (images, targets, lr) -> (loss,
    correct) device tensors."""

    def __init__(self, model, optimizer, criterion, amp, clip, graph=True):
        self.model, self.optimizer, self.criterion, self.amp, self.clip = model, optimizer, criterion, amp, clip
        self.graph, self.captured = graph, None
        if graph:                        # AdamW reads the learning rate and its step counts from the device
            device = next(model.parameters()).device
            self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
            for group in optimizer.param_groups:
                group["capturable"], group["lr"] = True, self.lr
            for state in optimizer.state.values():       # a run resumed from a CPU's last.pt has them there
                if "step" in state:
                    state["step"] = state["step"].to(device, torch.float32)

    def __call__(self, images, targets, lr):
        if not self.graph:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            return self.body(images, targets)
        self.lr.fill_(lr)                # a fill with a host number: no sync
        if self.captured is None:
            self.capture(images, targets)
        self.static_images.copy_(images)
        self.static_targets.copy_(targets)
        self.captured.replay()
        return self.static_result

    def body(self, images, targets):
        # Under a graph autocast's cache of cast weights is off, as PyTorch's notes on
        # make_graphed_callables ask of autocast in a capture.
        with torch.autocast(images.device.type, self.amp, enabled=self.amp is not None,
                            cache_enabled=not self.graph):
            logits = self.model(images)
        loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=not self.graph)    # a graph keeps its gradient buffers
        loss.backward()
        if self.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return loss.detach(), (logits.argmax(1) == targets.argmax(1)).sum()

    def capture(self, images, targets):
        """Record body() into a CUDA graph. The warm-up steps it needs first (on a side stream, as
        torch.cuda.graphs requires) change the weights, so everything they touch is put back."""
        self.static_images, self.static_targets = images.clone(), targets.clone()
        tensors = [*self.model.state_dict().values()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        saved = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.body(self.static_images, self.static_targets)
        torch.cuda.current_stream().wait_stream(side)
        # AdamW makes its state at its first step: what the warm-up made is reset to "no step yet".
        new = [t for state in self.optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and not any(t is s for s in tensors)]
        self.captured = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.captured):
            self.static_result = self.body(self.static_images, self.static_targets)
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
            for t in new:
                t.zero_()
