"""Tools for tests and benchmarks: random-weight checkpoints, the transformers reference, an API server process."""
