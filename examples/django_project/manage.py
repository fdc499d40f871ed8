#!/usr/bin/env python
"""The tokenlimit Django example: ``python manage.py check``, ``python manage.py runserver``.

    TOKENLIMIT_URL=redis://localhost:6379/0 python manage.py runserver

Without ``TOKENLIMIT_URL`` the limiter is ``memory://`` (one process only). Try it:

    curl -i localhost:8000/            # 5/minute per client (user, else IP)
    curl -i localhost:8000/async       # the same budget, from an async view
    curl -i localhost:8000/search      # 2/minute more, in a bucket of its own
    curl -i localhost:8000/health      # exempt: never limited
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
