"""``imgcache sizing`` against a real server: predictions, speed, the history's cost per hit:
``python -m bench.sizing.run``."""
