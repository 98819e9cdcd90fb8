"""adamax-ps server package: the Keras-exact Adamax engine, its kernels, and the gRPC service.

``from adamax_server import Adamax`` gives the in-process optimizer; it needs neither grpc nor
the generated protocol code.
"""

from .engine import Adamax, RowSparseGradient

__all__ = ["Adamax", "RowSparseGradient", "__version__"]
__version__ = "0.1.0"
