"""One cold image booted on every node of a simulated rack, with and without the shared tier:
``python -m bench.fleet.run`` (root)."""
