"""Benchmarks: canonical shapes (shared with tests), data-pipeline and (later) op and step timings."""
