"""Framework integrations: ``tokenlimit.integrations.fastapi``, ``.flask`` and ``.django``; for
outbound HTTP, ``.httpx`` and ``.requests``.

Each is importable only when its framework is installed; ``import tokenlimit`` imports none.
"""
