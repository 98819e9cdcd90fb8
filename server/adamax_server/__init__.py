"""adamax-ps server package: the Keras-exact Adamax engine (``optim``), coordination of many workers,
the gRPC and bulk transports, checkpoint storage, and the ``adamax-ps`` command line (``cli``).

``from adamax_server import Adamax`` gives the in-process optimizer; it needs neither grpc nor
the generated protocol code.
"""

from adamax_server._moved import SERVER_MOVES
from adamax_server.optim.engine import Adamax, RowSparseGradient
from adamax_wire._moved import install as _install_moved

_install_moved(SERVER_MOVES)

__all__ = ["Adamax", "RowSparseGradient", "__version__"]
__version__ = "0.1.0"
