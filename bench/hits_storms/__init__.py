"""Hit throughput against nginx serving the same file, and cold boot storms against direct
downloads: ``python -m bench.hits_storms.run`` (``make bench``)."""
