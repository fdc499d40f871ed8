"""Framework integrations: ``tokenlimit.integrations.fastapi``, ``.flask`` and ``.django``.

Each is importable only when its framework is installed; ``import tokenlimit`` imports none.
"""
