"""Content-addressable storage and the action cache, both on local disk."""
