"""Test doubles shared by the tests and the benchmarks: tiny random models built offline from configs.

Nothing in the library imports this package (a test enforces it).
"""
