"""Tests of the benchmark harnesses in benchmarks/ (a top-level package of the repository, not of the library)."""
