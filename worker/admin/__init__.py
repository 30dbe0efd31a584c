"""The operator interface: a gRPC service on its own address (admin.listen), the servicer over
the pools and the operation store, and configuration reload."""
