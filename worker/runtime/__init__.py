"""Container runtimes: the protocol the pool and executor use, and its Docker implementation."""
