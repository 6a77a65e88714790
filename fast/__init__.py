"""Optional speed code for train_cifar.py's --fast and --benchmark; the plain path needs none of it.

    depthwise.py      Triton depthwise convolution (forward, input and weight gradients)
    augment.py        the training augmentation, per image, for whole batches on the device
    benchmark.py      plain vs fast training throughput, profiled (train_cifar.py --benchmark)
    check_kernels.py  compiles the Triton kernels for an H100 without a GPU and checks them
"""
