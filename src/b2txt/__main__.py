"""``python -m b2txt COMMAND …``: the ``b2txt`` command line (``b2txt evaluate`` starts its LM
server and workers this way, with the interpreter it runs on)."""

import sys

from .cli import main

sys.exit(main())
