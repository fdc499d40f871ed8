"""A missing extra is a ConfigError naming the pip install, and still an ImportError."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenlimit import ConfigError
from tokenlimit._extras import MissingExtraError, needs_extra


def test_a_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "absent_framework_for_tests", None)
    extra = needs_extra("drf", "djangorestframework", feature="tokenlimit.integrations.drf")
    with pytest.raises(MissingExtraError) as caught, extra:
        import absent_framework_for_tests  # noqa: F401
    error = caught.value
    assert isinstance(error, ConfigError)
    assert isinstance(error, ModuleNotFoundError)
    assert error.name == "absent_framework_for_tests"
    assert error.extra == "drf"
    assert str(error) == (
        "tokenlimit.integrations.drf: needs djangorestframework (module "
        "'absent_framework_for_tests' is not installed): pip install 'tokenlimit[drf]'"
    )
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_other_errors_pass_through() -> None:
    with pytest.raises(ZeroDivisionError), needs_extra("drf", "djangorestframework", feature="x"):
        1 / 0  # noqa: B018
    own = needs_extra("drf", "djangorestframework", feature="x")
    with pytest.raises(ModuleNotFoundError) as caught, own:
        import tokenlimit._no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert not isinstance(caught.value, ConfigError)


def test_except_importerror_still_catches_it() -> None:
    code = (
        "import sys; sys.modules['absent_framework_for_tests'] = None\n"
        "from tokenlimit._extras import needs_extra\n"
        "try:\n"
        "    with needs_extra('celery', 'celery', feature='f'):\n"
        "        import absent_framework_for_tests\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "MissingExtraError absent_framework_for_tests"


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("tokenlimit.integrations.fastapi", "starlette", "fastapi"),
        ("tokenlimit.integrations.flask", "flask", "flask"),
        ("tokenlimit.integrations.django", "django", "django"),
        ("tokenlimit.integrations.drf", "rest_framework", "drf"),
        ("tokenlimit.integrations.celery", "celery", "celery"),
        ("tokenlimit.integrations.httpx", "httpx", "httpx"),
        ("tokenlimit.integrations.requests", "requests", "requests"),
    ],
)
def test_each_integration_without_its_framework_names_its_extra(
    module: str, framework: str, extra: str
) -> None:
    """Run in a fresh interpreter with the framework hidden, as on a machine without it."""
    code = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        "from tokenlimit import ConfigError\n"
        "try:\n"
        f"    import {module}\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(f"{module}: needs ")
    assert out.stdout.strip().endswith(f"pip install 'tokenlimit[{extra}]'")
