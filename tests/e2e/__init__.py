"""End-to-end tests: real redis-server, workers with the vLLM CPU engine, routers,
over real gRPC."""
