"""`make bench`: the sidecar path against raw docker exec and a container per action, one run."""
