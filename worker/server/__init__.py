"""Thin grpc.aio servicers: each parses its request, calls a domain object, builds the reply."""
