"""``python -m dsnb.runtime.server``: see :mod:`dsnb.runtime.server.server`."""

import sys

from dsnb.runtime.server.server import main

sys.exit(main())
