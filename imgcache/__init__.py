"""imgcache: a caching sidecar in front of the OpenStack Glance image API."""

__version__ = "0.1.0"
