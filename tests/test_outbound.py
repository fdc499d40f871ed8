"""The Retry-After rules every outbound integration shares (tokenlimit/integrations/_outbound.py):
which answers hold back every client of a key, and for how long."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tokenlimit._validate import MAX_HOLD
from tokenlimit.integrations._outbound import hold_seconds

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("status", "value", "expected"),
    [
        (429, "2", 2.0),
        (503, "120", 120.0),
        (429, " 7 ", 7.0),  # surrounding whitespace
        (429, "1.5", 1.5),  # a fraction: not RFC 9110's delay-seconds, but some APIs send one
        (429, "0", None),  # nothing to wait for
        (429, "-3", None),
        (429, "+3", None),
        (429, "1e3", None),
        (429, "nan", None),
        (429, "inf", None),
        (429, "", None),
        (429, "soon", None),
        (429, None, None),
        (429, "9" * 400, MAX_HOLD),  # capped at a day, whatever the upstream asks
        (429, "200000", MAX_HOLD),
        (500, "2", None),  # only 429 and 503 ask every client to wait
        (502, "2", None),
        (200, "2", None),
        (301, "2", None),
        # HTTP-dates (IMF-fixdate, and the obsolete forms parsedate accepts)
        (429, "Sun, 01 Mar 2026 12:00:30 GMT", 30.0),
        (503, "Sunday, 01-Mar-26 12:01:00 GMT", 60.0),
        (429, "Sun Mar  1 12:00:10 2026", 10.0),  # asctime: no zone, read as UTC
        (429, "Sun, 01 Mar 2026 11:59:00 GMT", None),  # past
        (429, "Sun, 01 Mar 2026 12:00:00 GMT", None),  # now
        (429, "Sun, 01 Mar 2026 13:00:00 +0100", None),  # = 12:00 UTC
        (429, "Sun, 01 Mar 2026 13:00:05 +0100", 5.0),
        (429, "Sun, 01 Mar 2126 12:00:00 GMT", MAX_HOLD),
        (429, "Sun, 41 Mar 2026 12:00:00 GMT", None),  # no such day
    ],
)
def test_hold_seconds(status: int, value: str | None, expected: float | None) -> None:
    assert hold_seconds(status, value, now=NOW) == expected


def test_a_date_is_read_against_this_hosts_clock() -> None:
    from email.utils import format_datetime

    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=60), usegmt=True)
    seconds = hold_seconds(429, soon)
    assert seconds is not None
    assert 55 < seconds <= 60


@pytest.mark.parametrize(
    ("module", "extra", "distribution"),
    [("httpx", "httpx", "httpx"), ("requests", "requests", "requests")],
)
def test_a_missing_extra_names_the_pip_install(module: str, extra: str, distribution: str) -> None:
    """Without the library, importing the integration is a ConfigError naming the install."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "try:\n"
        f"    import tokenlimit.integrations.{module}\n"
        "except ImportError as e:\n"
        "    from tokenlimit import ConfigError\n"
        "    print(isinstance(e, ConfigError), e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        f"True tokenlimit.integrations.{module}: needs {distribution} (module {module!r} is not "
        f"installed): pip install 'tokenlimit[{extra}]'"
    )


def test_import_tokenlimit_imports_neither() -> None:
    code = "import sys, tokenlimit; print('httpx' in sys.modules, 'requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
