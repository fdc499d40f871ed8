"""tokenlimit.integrations.celery in-process: options, keys, eager runs and direct calls,
refusals sent back to the queue, storage failures, the missing extra. The real worker (several
processes on a real broker) is tests/test_celery_worker.py."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("celery")

from celery import Celery
from celery.exceptions import Reject, Retry

import tokenlimit
from tokenlimit import BackendError, ConfigError, Limit, RateLimiter, RateLimitExceeded
from tokenlimit.integrations.celery import RateLimitedTask, countdown


class _App(Celery):  # type: ignore[misc]
    """Its tasks are its own: not shared with the apps of the tests after it."""

    def task(self, *args: Any, **options: Any) -> Any:
        options.setdefault("shared", False)
        return super().task(*args, **options)


@pytest.fixture
def app() -> Iterator[Celery]:
    """An app with no worker: tasks are called in this process (eager, apply, direct)."""
    app = _App("tests", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_eager_propagates = True
    yield app
    app.close()


@pytest.fixture
def memory() -> Iterator[RateLimiter]:
    with RateLimiter.from_url("memory://") as limiter:
        yield limiter


def worker_run(task: Any, *args: Any, retries: int = 0, **kwargs: Any) -> Any:
    """Call ``task`` as a worker does: under a delivered message's request."""
    task.push_request(
        id="task-1",
        args=args,
        kwargs=kwargs,
        retries=retries,
        called_directly=False,
        is_eager=False,
        delivery_info={},
    )
    try:
        return task(*args, **kwargs)
    finally:
        task.pop_request()


# -- options ----------------------------------------------------------------------------------


def test_every_limit_spelling(app: Celery, memory: RateLimiter) -> None:
    spellings: list[dict[str, Any]] = [
        {"rate_limit_global": "2/second"},
        {"rate_limit_global": 2, "rate_limit_burst": 2},
        {"rate_limit_global": "2/s", "rate_limit_burst": 2},
        {"rate_limit_global": Limit.per_second(2)},
        {"rate_limit_global": ["2/second", "100/day"]},
        {"rate_limit_global": lambda vendor: "2/second"},  # a chooser, with the arguments
    ]
    for n, options in enumerate(spellings):

        @app.task(
            name=f"spelling{n}",  # a bucket each: the default key is the task's name
            base=RateLimitedTask,
            rate_limit_limiter=memory,
            rate_limit_eager_timeout=0,
            **options,
        )
        def task(vendor: str) -> str:
            return vendor

        assert [task.apply(("v",)).get() for _ in range(2)] == ["v", "v"]
        with pytest.raises(RateLimitExceeded):
            task.apply(("v",)).get()


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"rate_limit_global": "10/fortnight"}, "rate_limit_global"),
        ({"rate_limit_global": object()}, "rate_limit_global"),
        ({"rate_limit_global": 10, "rate_limit_burst": 0}, "rate_limit_burst"),
        ({"rate_limit_global": Limit(10), "rate_limit_burst": 5}, "rate_limit_burst"),
        ({"rate_limit_burst": 5}, "rate_limit_burst"),
        ({"rate_limit_key": "vendor:{vendor}"}, "rate_limit_key"),
        ({"rate_limit_global": "10/s", "rate_limit_key": "x:{nope}"}, "rate_limit_key"),
        ({"rate_limit_global": "10/s", "rate_limit_key": 7}, "rate_limit_key"),
        ({"rate_limit_global": "10/s", "rate_limit_cost": 0}, "rate_limit_cost"),
        ({"rate_limit_global": "10/s", "rate_limit_cost": 11}, "rate_limit_cost"),
        ({"rate_limit_global": "10/s", "rate_limit_jitter": 2}, "rate_limit_jitter"),
        ({"rate_limit_global": "10/s", "rate_limit_max_countdown": 0}, "rate_limit_max_countdown"),
        ({"rate_limit_global": "10/s", "rate_limit_eager_timeout": -1}, "rate_limit_eager_timeout"),
        ({"rate_limit_global": "10/s", "rate_limit_limiter": "memory://"}, "rate_limit_limiter"),
    ],
)
def test_a_bad_option_is_named(app: Celery, options: dict[str, Any], option: str) -> None:
    @app.task(name="bad", base=RateLimitedTask, **options)
    def task(vendor: str) -> str:
        return vendor

    with pytest.raises(ConfigError) as caught:
        app.finalize()
    assert caught.value.param == option
    assert str(caught.value).startswith(f"{option}: ")


def test_an_async_limiter_is_refused(app: Celery) -> None:
    limiter = tokenlimit.AsyncRateLimiter.from_url("memory://")

    @app.task(name="a", base=RateLimitedTask, rate_limit_global=1, rate_limit_limiter=limiter)
    def task() -> None: ...

    with pytest.raises(ConfigError, match="rate_limit_limiter: must be a sync RateLimiter"):
        app.finalize()


def test_without_a_limit_it_is_a_plain_task(app: Celery) -> None:
    @app.task(base=RateLimitedTask)
    def task(x: int) -> int:
        return x

    assert [task.apply((i,)).get() for i in range(50)] == list(range(50))


# -- keys -------------------------------------------------------------------------------------


def test_key_template_over_bound_arguments_with_defaults(app: Celery, memory: RateLimiter) -> None:
    @app.task(
        bind=True,
        base=RateLimitedTask,
        rate_limit_global="1/minute",
        rate_limit_key="vendor:{vendor}:{region}",
        rate_limit_limiter=memory,
    )
    def fetch(self: Any, vendor: str, item: int, region: str = "eu") -> str:
        return f"{vendor}/{item}/{region}"

    assert fetch("acme", 1) == "acme/1/eu"
    assert fetch(vendor="acme", item=2, region="us") == "acme/2/us"
    assert fetch("globex", 3) == "globex/3/eu"
    minute = Limit.parse("1/minute")
    for key in ("vendor:acme:eu", "vendor:acme:us", "vendor:globex:eu"):
        assert memory.peek(key, minute).remaining == 0
    with pytest.raises(RateLimitExceeded):
        fetch("acme", 4, region="eu")


def test_key_callable_and_default_key(app: Celery, memory: RateLimiter) -> None:
    @app.task(
        name="keyed",
        base=RateLimitedTask,
        rate_limit_global="1/minute",
        rate_limit_key=lambda vendor, item: f"v:{vendor.lower()}",
        rate_limit_limiter=memory,
    )
    def keyed(vendor: str, item: int) -> int:
        return item

    @app.task(name="one.bucket", base=RateLimitedTask, rate_limit_global="1/minute")
    def plain() -> int:
        return 1

    assert keyed("ACME", 1) == 1
    assert memory.peek("v:acme", "1/minute").remaining == 0
    tokenlimit.configure(memory)  # the default limiter, when no rate_limit_limiter is given
    assert plain() == 1
    assert memory.peek("one.bucket", "1/minute").remaining == 0  # the task's name


def test_class_based_task_and_annotations(app: Celery, memory: RateLimiter) -> None:
    class Fetch(RateLimitedTask):
        name = "fetch.class"
        rate_limit_key = "vendor:{vendor}"
        rate_limit_limiter = memory

        def run(self, vendor: str) -> str:
            return vendor

    app.conf.task_annotations = {"fetch.class": {"rate_limit_global": "1/minute"}}
    task = app.register_task(Fetch())
    assert task("acme") == "acme"
    assert memory.peek("vendor:acme", "1/minute").remaining == 0


# -- eager runs and direct calls --------------------------------------------------------------


def test_eager_runs_wait_for_a_token(app: Celery, memory: RateLimiter) -> None:
    app.conf.task_always_eager = True

    @app.task(base=RateLimitedTask, rate_limit_global="5/second", rate_limit_limiter=memory)
    def task(x: int) -> int:
        return x

    started = time.monotonic()
    assert [task.delay(i).get() for i in range(7)] == list(range(7))
    assert time.monotonic() - started >= 0.3  # two refills of 0.2 s, waited for in acquire


def test_eager_runs_give_up_after_the_eager_timeout(app: Celery, memory: RateLimiter) -> None:
    app.conf.task_always_eager = True

    @app.task(
        base=RateLimitedTask,
        rate_limit_global="1/hour",
        rate_limit_eager_timeout=0.5,
        rate_limit_limiter=memory,
    )
    def task() -> int:
        return 1

    assert task.delay().get() == 1
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as caught:
        task.delay().get()
    assert time.monotonic() - started < 0.4  # an hour's wait is refused at once, no loop
    assert caught.value.retry_after > 3000
    with pytest.raises(RateLimitExceeded):
        task()  # a direct call alike


# -- refused in a worker: sent again -------------------------------------------------------------


def test_a_refused_run_is_sent_again_keeping_its_retries(app: Celery, memory: RateLimiter) -> None:
    sent: list[Any] = []

    @app.task(
        bind=True,
        base=RateLimitedTask,
        max_retries=2,
        rate_limit_global="1/second",
        rate_limit_key="vendor:{vendor}",
        rate_limit_limiter=memory,
    )
    def task(self: Any, vendor: str) -> str:
        return vendor

    task.signature_from_request = _recording(task.signature_from_request, sent)
    assert worker_run(task, "acme", retries=2) == "acme"
    with pytest.raises(Retry) as caught:
        worker_run(task, "acme", retries=2)  # at max_retries, yet put off, not failed
    retry = caught.value
    assert isinstance(retry.exc, RateLimitExceeded)
    assert 0.9 <= retry.exc.retry_after <= 1.0
    assert retry.exc.retry_after <= retry.when <= retry.exc.retry_after * 1.1
    (again,) = sent
    assert again.options["task_id"] == "task-1"  # the same task, not a copy
    assert again.options["retries"] == 2  # the task's own retries, untouched
    assert again.options["countdown"] == retry.when
    assert again.args == ("acme",)


def test_a_refusal_that_cannot_be_sent_is_rejected(app: Celery, memory: RateLimiter) -> None:
    @app.task(base=RateLimitedTask, rate_limit_global="1/minute", rate_limit_limiter=memory)
    def task() -> int:
        return 1

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("broker down")

    worker_run(task)
    task.signature_from_request = lambda *a, **k: _Unsendable(broken)
    with pytest.raises(Reject) as caught:
        worker_run(task)
    assert caught.value.requeue is False  # acks_late=False: acknowledged on delivery
    task.acks_late = True
    with pytest.raises(Reject) as caught:
        worker_run(task)
    assert caught.value.requeue is True  # back to the queue it came from


def test_countdown_is_retry_after_plus_a_little_jitter() -> None:
    assert countdown(2.0, jitter=0.1, cap=600, draw=lambda: 0.0) == 2.0
    assert countdown(2.0, jitter=0.1, cap=600, draw=lambda: 0.999) == pytest.approx(2.1998)
    assert countdown(2.0, jitter=0.0, cap=600) == 2.0
    assert countdown(86_000.0, jitter=0.1, cap=600, draw=lambda: 0.5) == 630.0  # capped
    waits = [countdown(1.0, jitter=0.1, cap=600) for _ in range(1000)]
    assert all(1.0 <= w < 1.1 for w in waits)
    assert len(set(waits)) > 900  # spread out, not one instant


def test_a_refusal_pickles_whole() -> None:
    limiter = RateLimiter.from_url("memory://")
    limiter.try_acquire("k", "1/second")
    decision = limiter.try_acquire("k", ["1/second", "10/minute"])
    copy = pickle.loads(pickle.dumps(RateLimitExceeded(decision)))
    assert copy.decision == decision
    assert str(copy) == str(RateLimitExceeded(decision))


# -- storage failures -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_storage_failure_follows_the_failure_mode(app: Celery, mode: str) -> None:
    down = RateLimiter.from_url("redis://127.0.0.1:9/0", timeout=0.2, failure_mode=mode)

    @app.task(base=RateLimitedTask, rate_limit_global=10, rate_limit_limiter=down)
    def task() -> int:
        return 1

    try:
        if mode == "open":
            assert worker_run(task) == 1
            assert task() == 1
        else:
            with pytest.raises(BackendError):
                worker_run(task)
            with pytest.raises(BackendError):
                task()
    finally:
        down.close()


# -- the extra --------------------------------------------------------------------------------


def test_without_celery_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['celery'] = None\n"
        "try:\n"
        "    import tokenlimit.integrations.celery\n"
        "except Exception as e:\n"
        "    import tokenlimit\n"
        "    print(isinstance(e, tokenlimit.ConfigError), e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "True tokenlimit.integrations.celery: needs celery (module 'celery' is not installed): "
        "pip install 'tokenlimit[celery]'"
    )


# -- helpers ----------------------------------------------------------------------------------


def _recording(make: Any, sent: list[Any]) -> Any:
    def signature_from_request(*args: Any, **kwargs: Any) -> Any:
        signature = make(*args, **kwargs)
        sent.append(signature)
        return _Unsendable(lambda: None, signature)

    return signature_from_request


class _Unsendable:
    """A signature whose ``apply_async`` is ``send`` (no broker needed)."""

    def __init__(self, send: Any, signature: Any = None) -> None:
        self._send = send
        self.signature = signature

    def apply_async(self) -> Any:
        return self._send()
