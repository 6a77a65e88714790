"""Optional speed code for train_cifar.py; the plain path needs none of it.

    depthwise.py      Triton depthwise convolution (forward, input and weight gradients)       --fast
    augment.py        the training augmentation, per image, for whole batches on the device    --fast
    step.py           the training step without a host sync, optionally as a CUDA graph    --step-mode
    gelu_batchnorm.py GELU -> BatchNorm2d and the skip connection fused in Triton (opt-in)   --fused-norm
    benchmark.py      every path's training throughput at batch 64 and 512, profiled (a script)
    check_kernels.py  compiles the Triton kernels for an H100 (--arch: others) without a GPU, checks them
"""
