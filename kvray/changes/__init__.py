"""The change stream that keeps read replicas of the index exact, in one package.

* ``journal``: the messages (``ChangeMsg``, ``ReplicaSnapshot``), the ``Journal`` a shard
  writes through (records what changed) and the ``ReplicaIndex`` that applies them (pure:
  no Ray, no sockets);
* ``publisher``: a shard's PUB socket, seq numbers and heartbeats (``ChangePublisher``);
* ``replica``: the subscriber keeping an in-process copy current (``Replica``).
"""
