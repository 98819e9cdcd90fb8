"""Observability shared by the transports and the command line: Prometheus metrics (including the
coordinator observer and the gRPC interceptor) and logging (plain or JSON lines)."""
