"""The Redis/Valkey wing: everything that speaks to a server, behind the backend seam.

``sync``/``aio`` are the backends' thin shells; ``replies`` decides what each reply means (pure);
``batch`` pipelines async decisions; ``resp`` is the wire format; ``driver`` lists every redis-py
internal the fast paths touch; ``pools`` the limiter's own connections and deadlines;
``sentinel``, ``topology`` and ``server_check`` the rest; ``survey`` is the command line's
(``tokenlimit check``). ``import tokenlimit`` loads only
``resp``, ``pools`` and ``driver`` (no probe, no connection); the backends load on first use.
"""
