"""sidecar-executor: a REAPI v2 service that runs actions in warm per-image sidecar containers."""
