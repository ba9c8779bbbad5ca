"""qsload: a ghz-compatible gRPC load generator (grpc.aio) with streaming metrics.

``python -m loadtest --insecure --call qwen_serve.api.v1.Inference/Chat -D loadtest/data/chat.json
-c 8 -n 64 127.0.0.1:50051`` takes ghz's main flags, resolves the method by server
reflection (no .proto files) and writes ghz's report formats, plus time to first token,
inter-token latency and tokens per second for streaming calls. See loadtest/README.md.
"""
