"""Benchmark drivers: engine path (a)-(d) and router capacity; they write docs/benchmarks.md.

Nothing here is part of the product. ``bench.sim_worker`` is a SIMULATED engine
used only to measure the router and queue; no test that claims to test the
system may use it.
"""
