"""Score checkpoints on a config's validation set, every snapshot of a run, or predict on your own images.

    python eval.py --config CONFIG --checkpoint best.pt [--each] [--out DIR] [section.key=value ...]
    python eval.py --run-dir runs/gta5_bisenet/<time>
    python eval.py --config CONFIG --checkpoint best.pt|model.onnx --images DIR|VIDEO --out DIR
"""
import sys

from rtda.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
