"""The Redis LM server, its client and evaluation through it (REFERENCE §5).

- :mod:`b2txt.server.protocol` — stream/key/field names, logits encoding, parameter updates;
- :mod:`b2txt.server.connection` — addresses (Unix socket / loopback), passwords, connections;
- :mod:`b2txt.server.redis_process` — a private ``redis-server`` that dies with its parent;
- :mod:`b2txt.server.lm_server` — the server: a router and N decoding worker processes;
- :mod:`b2txt.server.client` — one client session, trial by trial;
- :mod:`b2txt.server.evaluate` — a whole logits file through Redis, scored;
- :mod:`b2txt.server.group` — batch mode: whole trials shared by ``lm-worker`` processes on any
  host through a Redis consumer group (claiming the trials of dead workers);
- :mod:`b2txt.server.commands` — ``b2txt lm-server``, ``b2txt lm-worker`` and ``b2txt evaluate``.
"""
