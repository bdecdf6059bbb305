"""Benchmarks: programs that start real stages, measure, and print numbers (not tests)."""
