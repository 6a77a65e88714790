"""Parts of train_cifar.py kept in their own modules, so that the trainer reads top to bottom as the recipe.

    randaugment.py    timm's RandAugment "rand-m9-mstd0.5-inc1" (the paper's), op by op, in torchvision
    files.py          the run's checkpoints and log, written to survive kills and full disks; --resume
    housekeeping.py   flag checks, data download errors, progress lines, Ctrl-C
"""
