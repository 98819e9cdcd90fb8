"""Module paths of the flat layout (before the layered packages) -> where they live now."""

SERVER_MOVES = {
    "adamax_server.engine": "adamax_server.optim.engine",
    "adamax_server.schedules": "adamax_server.optim.schedules",
    "adamax_server.kernels": "adamax_server.optim.kernels",
    "adamax_server.coordinator": "adamax_server.coordination.coordinator",
    "adamax_server.snapshot": "adamax_server.coordination.snapshot",
    "adamax_server.service": "adamax_server.transport.service",
    "adamax_server.bulk": "adamax_server.transport.bulk",
    "adamax_server.security": "adamax_server.transport.security",
    "adamax_server.validation": "adamax_server.transport.validation",
    "adamax_server.checkpoint_service": "adamax_server.transport.checkpoint_service",
    "adamax_server.server": "adamax_server.transport.server",
    "adamax_server.checkpoint": "adamax_server.storage.checkpoint",
    "adamax_server.checkpointing": "adamax_server.storage.checkpointing",
    "adamax_server.runtime": "adamax_server.cli.runtime",
    "adamax_server.metrics": "adamax_server.ops.metrics",
    "adamax_server.logging_setup": "adamax_server.ops.logging_setup",
    "adamax_server.status_view": "adamax_server.cli.status_view",
    "adamax_server.checkpoint_cli": "adamax_server.cli.checkpoint_cli",
    "adamax_server.demo": "adamax_server.cli.demo",
    "adamax_server.bench": "adamax_server.cli.bench",
}
