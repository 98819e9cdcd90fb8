"""Coordination: many workers on one optimizer.

Policies (async / sync K-of-N, staleness), sync rounds, the exactly-once table, and the
``OptimizerHost`` that serialises pushes, applies them through ``optim`` and serves pulls.
``Coordinator`` owns the hosts of one server. Transport-neutral: no grpc here.
"""
