"""Benchmark, parity harness and profiler ranges, installed as dtql_fast.profiling."""
