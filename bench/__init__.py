"""Benchmarks: ours and the reference side by side in one run, printing the ratio."""
