"""TRL adapter for ntl (see adapters/trl/README.md)."""
