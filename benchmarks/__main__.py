"""``python -m benchmarks``: same as ``ntl bench``."""

from .harness import main

raise SystemExit(main(prog="python -m benchmarks"))
