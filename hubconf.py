"""torch.hub entry points of this repository:

    model = torch.hub.load("<owner>/<repo>", "convmixer_1536_20", pretrained=True)
    model = torch.hub.load("path/to/this/checkout", "convmixer_cifar10", source="local")

Each returns the plain nn.Sequential of convmixer.py; `pretrained=True` loads the released weights
(convmixer.PRETRAINED, which also holds the preprocessing they expect).
"""
dependencies = ["torch"]

from convmixer import (ConvMixer, convmixer_768_32, convmixer_1024_20, convmixer_1536_20,  # noqa: E402,F401
                       convmixer_cifar10)
