"""`python -m datasets.synthetic` is now `python -m rtda.datasets.synthetic`; this shim says so and runs it."""
import sys

if __name__ == "__main__":
    from rtda.datasets.synthetic import main

    print("note: `python -m datasets.synthetic` is now `python -m rtda.datasets.synthetic`", file=sys.stderr)
    sys.exit(main())
