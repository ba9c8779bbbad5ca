"""grpc.health.v1 for the router: liveness and readiness.

``liveness`` is SERVING while the process runs. The empty service name and
the Inference service are SERVING only when Redis answers, at least one
worker has a fresh heartbeat and the router is not draining.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from qwen_serve.api.v1 import serve_pb2
from router.cluster import ClusterView

LIVENESS = "liveness"
INFERENCE = serve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Keeps the health servicer's statuses in step with the cluster view."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._ready: bool | None = None

    async def start(self) -> None:
        """Mark the process live and not yet ready."""
        await self.servicer.set(LIVENESS, SERVING)
        await self._set_ready(False)

    async def on_view(self, view: ClusterView) -> None:
        """Listener for Dispatcher: update readiness when it changes."""
        if view.ready != self._ready:
            self._ready = view.ready
            await self._set_ready(view.ready)

    async def _set_ready(self, ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        for name in ("", INFERENCE):
            await self.servicer.set(name, status)

    async def stop(self) -> None:
        """Everything NOT_SERVING (used when draining)."""
        await self.servicer.enter_graceful_shutdown()
