"""imgcache against nginx proxy_cache and Varnish, side by side in one run:
``python -m bench.peers.run``."""
