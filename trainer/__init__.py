"""Parts of train_cifar.py kept in their own modules, so that the trainer reads top to bottom as the recipe.

    randaugment.py    timm's RandAugment "rand-m9-mstd0.5-inc1" (the paper's), op by op, in torchvision
    housekeeping.py   flag checks, the run's files and --resume, progress lines, Ctrl-C
"""
