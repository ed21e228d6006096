"""The Redis side of the hub, one module per job. A publication from a backend goes through them
in this order:

- ``wire``: what crosses Redis: the channel names, and each envelope's packing beside its
  opening and checks (signatures included);
- ``publisher``: the SDK (``Publisher``, ``AsyncPublisher``) that packs and publishes them; the
  hub's own publishes go through it too;
- ``cluster``: on a Redis Cluster, which shard owns a name (``SlotMap``) and commands routed
  there (``Router``), over ``pipeline`` (one pipelined connection) and ``resp`` (RESP read and
  written past redis-py's per-command layers);
- ``link``: a pub/sub connection kept alive (subscribe in batches, read, probe, reconnect);
- ``broker``: the ``hub.broker.Broker`` on Redis: subscribes what the node needs, opens every
  message once and hands it to the node; ``cluster_broker``: the same with a link per shard;
- ``script``: the Lua scripts the hub runs in Redis (history, presence, inboxes).

Nothing is imported here, so that importing one module does not load them all.
"""
