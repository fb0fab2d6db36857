"""FDA's pseudo-labels for the self-supervised round: `python adapt.py pseudo-labels --config ... --checkpoint ...`."""
import sys

from rtda.adapt import main

if __name__ == "__main__":
    sys.exit(main())
