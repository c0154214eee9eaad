"""Microbenchmarks and profiles: run as ``keeplora bench ...``, ``keeplora profile ...`` or ``python -m
keeplora_bench.micro.<module>``; rows go to ``benchmarks/results/<name>.csv`` through ``harness``."""
