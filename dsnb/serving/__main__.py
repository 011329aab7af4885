"""``python -m dsnb.serving``: see :mod:`dsnb.serving.server`."""

import sys

from dsnb.serving.server import main

sys.exit(main())
