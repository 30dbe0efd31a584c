"""Prometheus metrics: what the pools, the execution queue, the CAS and the gRPC server report,
and the HTTP endpoint that serves them (setting metrics.listen)."""
