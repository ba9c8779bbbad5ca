#!/usr/bin/env python3
"""Query grpc.health.v1 once; exit 0 when the service is SERVING, 1 otherwise.

The router image's Docker HEALTHCHECK (Kubernetes uses its native ``grpc`` probes):

    qs-grpc-health --address 127.0.0.1:50051 --service liveness
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """Whether ``service`` at ``address`` answers SERVING, with the status or error."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: list[str] | None = None) -> int:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="liveness", help="'' is overall readiness")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    ok, status = check(args.address, args.service, args.timeout_s)
    print(f"{args.address} {args.service or '(overall)'}: {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
