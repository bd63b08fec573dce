"""ntl benchmark harness: ``ntl bench`` / ``python -m ntl.bench`` (see benchmarks/README.md in the repo)."""
