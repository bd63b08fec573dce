"""verl adapter for ntl (see adapters/verl/README.md)."""
