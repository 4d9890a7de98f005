"""Benchmarks (``make bench``): not tests; each prints rows measured against a same-run baseline."""
