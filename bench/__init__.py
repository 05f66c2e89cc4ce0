"""imgcache's benchmarks, one subpackage per suite, run from the repository's root as
``.venv/bin/python -m bench.SUITE.ENTRY`` (see bench/README.md): ``hits_storms`` (hits
against nginx, cold storms against direct downloads), ``peers`` (against nginx proxy_cache
and Varnish), ``fleet`` (a rack with a shared tier), ``sizing`` (``imgcache sizing``
against a real server), ``scaling`` (start-up and ``imgcache clear`` with many entries),
``auth`` (what the download check costs a hit); ``common`` holds what they share.

Some suites run parts of the test suite (tests/processes.py, netsim.py, fleetsim.py,
realglance.py): tests/ is not a package, so importing ``bench`` puts it on ``sys.path``.
"""

import sys

from bench.common.paths import TESTS

if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))
