"""Train a segmentation model, optionally with domain adaptation (the trainer is rtda.engine).

    python train.py --config configs/gta5_bisenet.yaml [section.key=value ...] [--resume auto|PATH] [--work-dir runs]
    torchrun --nproc_per_node 4 train.py --config configs/cityscapes_deeplabv2.yaml
"""
import sys

from rtda.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
