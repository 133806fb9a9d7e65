"""Helpers shared by the tests (and benchmarks/): data makers, fixtures' building blocks."""
