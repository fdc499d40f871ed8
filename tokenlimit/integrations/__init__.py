"""Framework integrations: ``tokenlimit.integrations.fastapi``, ``.flask``, ``.django`` and
``.drf`` (Django REST framework's throttles).

Each is importable only when its framework is installed; ``import tokenlimit`` imports none.
"""
