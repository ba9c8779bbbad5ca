"""Development tools, apart from the product (not in the wheel or the images).

``devstack``: redis-server, workers and routers as local processes, for the demo
(``scripts/demo.sh``), the tests and the benchmarks. ``overlap``: how many intervals
were open at once, for the tests and benchmarks of in-flight caps. ``stallmon``: how
late a sleeping process wakes up (``python -m qwen_serve_dev.stallmon``), to see
whole-process stalls of the host beside a test run.
"""
