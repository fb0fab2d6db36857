"""`python -m models.export` is now `python -m rtda.models.export`; this shim says so and runs it."""
import sys

if __name__ == "__main__":
    from rtda.models.export import main

    print("note: `python -m models.export` is now `python -m rtda.models.export`", file=sys.stderr)
    sys.exit(main())
