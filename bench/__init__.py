"""Benchmarks of training and serving: run each from the repository root as `.venv/bin/python -m bench.NAME`."""
