"""The Redis LM server, its client, the lm-workers and evaluation through them (REFERENCE §5).

Every runtime decodes through the one decoding core, :class:`b2txt.lm.core.DecodingCore`.

- :mod:`.protocol` — stream/key/field names, logits encoding, parameter updates;
- :mod:`.connection` — addresses (Unix socket / loopback), passwords, TLS, connections;
- :mod:`.redis_process` — a private ``redis-server`` that dies with its parent;
- :mod:`.supervisor` — the watched child processes of ``b2txt evaluate``;
- the LM server (``b2txt lm-server``): :mod:`.lm_server` (settings, jobs, replies), :mod:`.router`
  (the main process: sessions and Redis), :mod:`.worker_processes` (starting and replacing the
  workers), :mod:`.decoding_worker` (one worker process);
- :mod:`.client` — one client session, trial by trial;
- the trial queue for workers on many hosts: :mod:`.trial_queue` (its protocol),
  :mod:`.lm_worker` (``b2txt lm-worker``);
- ``b2txt evaluate``: :mod:`.evaluate` (a logits file in, the scored outputs out), its two modes
  :mod:`.evaluate_sessions` (through the LM server) and :mod:`.evaluate_group` (through lm-workers),
  and what they share, :mod:`.evaluate_common`.
"""
