"""What Glance's download check costs a hit: ``python -m bench.auth.authcost``."""
