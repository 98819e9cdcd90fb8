"""Running the server: the ``adamax-ps`` command line (``commands``), its runtime configuration
(flags, ``ADAMAX_PS_*`` environment, graceful shutdown: ``runtime``), the status view, the
checkpoint commands, and the demo and benchmark runner beside them."""

from adamax_server.cli.commands import main

__all__ = ["main"]
