"""The math: the Keras-exact Adamax engine, learning-rate schedules and the update kernels.

This layer imports neither grpc nor the generated wire code; everything above it (coordination,
transports, storage) calls into it, never the other way round.
"""
