"""Development tools, apart from the product (not in the wheel or the images).

``devstack``: redis-server, workers and routers as local processes, for the demo
(``scripts/demo.sh``), the tests and the benchmarks. ``overlap``: how many intervals
were open at once, for the tests and benchmarks of in-flight caps.
"""
