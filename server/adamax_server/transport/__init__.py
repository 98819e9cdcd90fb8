"""Transports: how requests reach the coordinator.

The gRPC servicers (``service``, ``checkpoint_service``) and the bulk channel (``bulk``) are
translators: they decode the wire contract (``adamax_wire``), validate it (``validation``), call the
coordinator and map errors back to statuses. ``security`` holds TLS and token checks, ``server``
assembles one process's gRPC server.
"""
