"""Generated protobuf/gRPC modules for adamax.v1 (scripts/gen_proto.py; do not edit)."""
