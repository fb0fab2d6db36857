"""`python -m datasets` is now `python -m rtda.datasets`; this shim says so and runs it."""
import sys

from rtda.datasets.__main__ import main

print("note: `python -m datasets` is now `python -m rtda.datasets`", file=sys.stderr)
sys.exit(main())
