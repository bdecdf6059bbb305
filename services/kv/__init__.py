"""The KV tier: how the mesh names KV blocks, publishes where they are, shards the KV
store, and moves bytes over NIXL.

- :mod:`services.kv.hashing` — the chained block hash every stage agrees on;
- :mod:`services.kv.events` — a publisher's sequenced KV-event log (engines, store);
- :mod:`services.kv.shards` — the KV store's consistent-hash ring, kept in etcd;
- :mod:`services.kv.store_link` — an engine's link to the store: Lookup/Reserve over
  gRPC, the bytes over NIXL;
- :mod:`services.kv.nixl` — NIXL loaded without torch, and its progress-thread clamp.

No torch or vLLM here: the router and the KV store use all of it.
"""
