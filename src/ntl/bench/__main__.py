"""``python -m ntl.bench``: same as ``ntl bench``."""

from .harness import main

raise SystemExit(main(prog="python -m ntl.bench"))
