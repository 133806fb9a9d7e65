"""``python -m b2txt.server lm-server|evaluate …`` (the same commands as ``b2txt``)."""

import sys

from .commands import main

sys.exit(main())
