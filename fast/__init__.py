"""Optional speed code for train_cifar.py (--fast); the plain path needs none of it.

    depthwise.py      Triton depthwise convolution (forward, input and weight gradients), and its check
    augment.py        the training augmentation, per image, for whole batches on the device
    step.py           the seam to train_cifar.py: the Triton kernels swapped in, the step as a CUDA graph
    benchmark.py      the plain and fast paths' training throughput at batch 64 and 512, profiled (a script)
    check_kernels.py  compiles the Triton kernels for an H100 (--arch: others) without a GPU, checks them
"""
