"""Pools of long-lived sidecar containers, one pool per image (and user, network, limits)."""
