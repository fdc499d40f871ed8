"""Framework integrations: ``tokenlimit.integrations.fastapi``, ``.flask``, ``.django`` and
``.drf`` (Django REST framework's throttles); for outbound HTTP, ``.httpx`` and ``.requests``.

Each is importable only when its framework is installed; ``import tokenlimit`` imports none.
"""
