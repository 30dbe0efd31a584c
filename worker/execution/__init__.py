"""Remote execution: platform resolution, staging, running in sidecars, outputs, scheduling."""
