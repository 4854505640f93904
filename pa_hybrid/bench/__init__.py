"""Benchmarks of pa_hybrid: the decode benchmark (``python -m pa_hybrid.bench``) and the
timing primitives (``pa_hybrid.bench.timing``) other benchmarks reuse."""
