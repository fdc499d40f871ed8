#!/usr/bin/env python
"""The tokenlimit Django REST framework example: ``python manage.py check``, ``runserver``.

    TOKENLIMIT_URL=redis://localhost:6379/0 python manage.py runserver

Without ``TOKENLIMIT_URL`` the limiter is ``memory://`` (one process only). Try it:

    curl -i localhost:8000/hello                                  # anonymous: 5/min per IP
    curl -i -H 'Authorization: Token alice' localhost:8000/hello  # alice: 10/min, her own
    curl -i -H 'Authorization: Token alice' localhost:8000/upload # scope "uploads": 2/min
    curl -i -H 'Authorization: Token alice' localhost:8000/search # 1/s, bursts of 3

``python compare.py`` fires 8 clients at once at DRF's own throttle and at tokenlimit's.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
