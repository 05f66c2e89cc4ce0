"""``python -m imgcache`` is the ``imgcache`` command."""

import sys

from imgcache.cli import main

sys.exit(main())
