"""ASGI entry point: ``uvicorn asgi:application`` (async views then never wait on Redis)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
application = get_asgi_application()
