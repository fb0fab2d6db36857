"""`python -m rtda.evaluation ...` is `python eval.py ...`."""
import sys

from rtda.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
