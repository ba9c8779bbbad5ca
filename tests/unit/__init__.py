"""Tests of one part at a time, without the router and worker stack (some use a real
redis-server or the CPU engine)."""
