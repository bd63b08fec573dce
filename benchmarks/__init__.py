"""ntl benchmark harness (see benchmarks/README.md)."""
