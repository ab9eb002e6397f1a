"""Benchmarks and synthetic models of real shapes."""
