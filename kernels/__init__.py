"""Triton kernels for DTQL's EDM losses, installed as dtql_fast.kernels (one file per op)."""
