"""``python -m adamax_server.cli``: the same as the ``adamax-ps`` console script."""

import sys

from adamax_server.cli.commands import main

sys.exit(main())
