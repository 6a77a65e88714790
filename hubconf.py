"""torch.hub entry points of this repository:

    model = torch.hub.load("<owner>/<repo>", "convmixer_1536_20", pretrained=True)
    model = torch.hub.load("path/to/this/checkout", "convmixer_cifar10", source="local", pretrained=True)

Each returns the plain nn.Sequential of convmixer.py; `pretrained=True` loads the released weights
(convmixer.PRETRAINED, which also holds the preprocessing they expect): the authors' ImageNet-1k
ones, downloaded, and for convmixer_cifar10 this repository's 200-epoch run (95.88%), in the checkout.
"""
dependencies = ["torch"]

from convmixer import (ConvMixer, convmixer_768_32, convmixer_1024_20, convmixer_1536_20,  # noqa: E402,F401
                       convmixer_cifar10)
