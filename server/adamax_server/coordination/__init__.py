"""Coordination: many workers on one optimizer, decided once for any number of shards.

Policies (async / sync K-of-N, staleness), the push decisions (``sequencing``: step checks,
the non-finite policy, the sync round), the exactly-once table, gradient statistics and the
snapshot format. Who carries the decisions out is ``sharding``: a server's optimizer is a
one-shard job (``sharding.single.OptimizerHost``, owned by ``sharding.coordinator``).
Transport-neutral: no grpc here.
"""
