"""How one-off operations scale with the number of cached entries: start-up
(``python -m bench.scaling.startup``) and ``imgcache clear`` (``python -m bench.scaling.clear``)."""
