"""Benchmarks: routing, forward, generation, training, serving."""
