"""`python adapt.py pseudo-labels` is now `python -m rtda.adapt.pseudo_labels`; this shim says so and runs it."""
import sys

from rtda.adapt.pseudo_labels import main

if __name__ == "__main__":
    print("note: `python adapt.py pseudo-labels` is now `python -m rtda.adapt.pseudo_labels`", file=sys.stderr)
    sys.exit(main())
