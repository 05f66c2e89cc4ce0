"""The network the suites run over: an emulated link with a real MTU, delay, jitter and
reordering between imgcache and what it talks to (link.py, forwarder.py), and the pytest
fixture that makes it (fixtures.py). See the README's Tests section."""
