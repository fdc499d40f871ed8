"""The circuit breaker: which calls go to the server while it fails, for every failure mode.

    closed  --``failures`` consecutive storage failures-->  open
    open    --the first call after the cool-down (the probe)-->  half-open
    half-open  --the server answered-->  closed (the cool-down starts again from ``cool_down``)
    half-open  --the probe failed-->  open, for twice the last cool-down (at most ``max_cool_down``)

- Closed: every call goes to the server. Open: none does; the limiter applies its failure mode
  at once. Half-open: the probe is the only call on the server; every other one, in any thread
  or task, still gets the failure mode at once.
- What opens it: calls the server did not answer (``BackendError`` reason ``timeout`` or
  ``connection``), the ones that wait out the deadline or reconnect. An error reply (``server``,
  ``cluster``, ``protocol``: OOM, NOPERM, LOADING, a MOVED a plain client cannot follow) came
  at once and is often about one key: it is an answer, and skipping the server would save no
  time while failing the keys that work. It still trips the circuit (the call failed) without
  counting towards ``threshold``.
- Any answer closes the circuit, even one to a call sent before it opened: the server is there.
- A probe that never reports (its caller was cancelled, or raised something that is not a
  storage failure) does not hold the circuit half-open: once one more cool-down has passed,
  another call probes.
- ``tripped`` is False exactly while closed with no failure counted since the last answer. It is
  read without the lock, once per call: the one thing a call pays while all is well (a stale
  read costs that call one routing decision, never a wrong state).

Pure: no IO, never awaits; thread-safe (one lock, taken only while tripped); an injected clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import ConfigError, ConfigTypeError
from ._validate import check_int, check_number

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "NO_ANSWER",
    "OPEN",
    "STATES",
    "Breaker",
    "Circuit",
    "check_breaker",
]

CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # also the values of the tokenlimit_circuit_state gauge
STATES = ("closed", "open", "half_open")  # by value
MAX_FAILURES = 1_000_000
MAX_COOL_DOWN = 86_400.0  # seconds: a day
NO_ANSWER = ("timeout", "connection")  # the BackendError reasons that count towards opening
LOCAL_FAILURES = 1  # failure_mode="local": a failed call is decided locally anyway
OTHER_FAILURES = 3  # "closed"/"open": one lost reply must not fail a cool-down's worth of calls

# Called under the circuit's lock with (circuit, before, after) on every change of state, so the
# order of calls is the order of changes; it may read the circuit's properties, nothing more.
Listener = Callable[["Circuit", int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Breaker:
    """How a limiter's circuit breaker trips and recovers (``breaker=`` on a limiter).

    ``failures``: consecutive storage failures that open the circuit (None: 3, or 1 with
    ``failure_mode="local"``, which decides a failed call locally anyway). ``cool_down``:
    seconds the circuit stays open before one call probes the server; each failed probe doubles
    it, up to ``max_cool_down``; an answer starts it again from ``cool_down``.
    """

    failures: int | None = None
    cool_down: float = 1.0
    max_cool_down: float = 10.0

    def __post_init__(self) -> None:
        if self.failures is not None:
            check_int("failures", self.failures, minimum=1, maximum=MAX_FAILURES)
        first = check_number("cool_down", self.cool_down, maximum=MAX_COOL_DOWN)
        most = check_number("max_cool_down", self.max_cool_down, maximum=MAX_COOL_DOWN)
        if most < first:
            raise ConfigError(
                "max_cool_down",
                f"must be >= cool_down ({self.cool_down!r}), got {self.max_cool_down!r}",
            )

    def threshold(self, failure_mode: str) -> int:
        """The consecutive failures that open the circuit under ``failure_mode``."""
        if self.failures is not None:
            return self.failures
        return LOCAL_FAILURES if failure_mode == "local" else OTHER_FAILURES


def check_breaker(value: object) -> Breaker | None:
    """``breaker=``: True (the defaults), False (off: every call tries the server) or a
    ``Breaker``."""
    if value is True:
        return Breaker()
    if value is False:
        return None
    if isinstance(value, Breaker):
        return value
    raise ConfigTypeError(
        "breaker", f"must be True, False or a tokenlimit.Breaker, not {type(value).__name__}"
    )


class Circuit:
    """One limiter's circuit (see the module docstring). ``threshold`` may be ``math.inf``:
    a circuit that never opens, still telling a clean run from one with failures (for
    ``failure_mode="local"`` with ``breaker=False``)."""

    __slots__ = (
        "_clock",
        "_cool_down",
        "_failures",
        "_listener",
        "_lock",
        "_probe_at",
        "first_cool_down",
        "max_cool_down",
        "state",
        "threshold",
        "tripped",
    )

    def __init__(
        self,
        threshold: float,
        cool_down: float = 1.0,
        max_cool_down: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
    ) -> None:
        self.threshold = threshold
        self.first_cool_down = cool_down
        self.max_cool_down = max_cool_down
        self._clock = clock
        self._listener = listener
        self._lock = threading.Lock()
        self.tripped = False  # read without the lock (see the module docstring)
        self.state = CLOSED
        self._failures = 0  # consecutive, since the last answer
        self._cool_down = cool_down  # the current one: grows while probes fail
        self._probe_at = -math.inf  # while open or half-open: when the next probe may go

    @classmethod
    def of(
        cls,
        breaker: Breaker | None,
        failure_mode: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
    ) -> Circuit:
        """The circuit ``breaker`` describes (None: one that never opens)."""
        if breaker is None:
            return cls(math.inf, clock=clock, listener=listener)
        return cls(
            breaker.threshold(failure_mode),
            breaker.cool_down,
            breaker.max_cool_down,
            clock=clock,
            listener=listener,
        )

    @property
    def failures(self) -> int:
        """Consecutive storage failures since the server last answered."""
        return self._failures

    @property
    def cool_down(self) -> float:
        """The current cool-down, in seconds (the last one, while closed)."""
        return self._cool_down

    def next_probe_in(self) -> float:
        """Seconds until a call may probe the server (0.0 when closed or due now)."""
        if self.state == CLOSED:
            return 0.0
        return max(0.0, self._probe_at - self._clock())

    def route(self) -> bool:
        """Whether this call goes to the server. Asked only while ``tripped``: closed, it goes;
        open, only the first call after the cool-down goes (the probe: half-open from then)."""
        with self._lock:
            if self.state == CLOSED:
                return True
            now = self._clock()
            if now < self._probe_at:
                return False
            # This call probes. Should it never report, another may after one more cool-down.
            self._probe_at = now + self._cool_down
            self._become(HALF_OPEN)
            return True

    def failed(self, *, answered: bool = False) -> bool:
        """A call to the server failed (``BackendError``): with no answer, or with an error
        reply (``answered``, which closes the circuit: the server is there). True if it was the
        first failure since the server last answered a call without an error."""
        with self._lock:
            first = not self.tripped
            self.tripped = True
            if answered:
                self._failures = 0
                self._probe_at = -math.inf
                self._become(CLOSED)
                self._cool_down = self.first_cool_down
                return first
            self._failures += 1
            if self.state == HALF_OPEN:  # the probe failed: open again, for longer
                self._cool_down = min(self._cool_down * 2, self.max_cool_down)
                self._open()
            elif self.state == CLOSED and self._failures >= self.threshold:
                self._cool_down = self.first_cool_down
                self._open()
            # Open: a call sent before the circuit opened; it changes nothing.
            return first

    def answered(self) -> bool:
        """The server answered a call. True if that cleared failures counted before it (the
        circuit closes, if it was not closed)."""
        with self._lock:
            if not self.tripped:
                return False
            self._failures = 0
            self._probe_at = -math.inf
            self.tripped = False
            self._become(CLOSED)
            self._cool_down = self.first_cool_down
            return True

    def _open(self) -> None:
        self._probe_at = self._clock() + self._cool_down
        self._become(OPEN)

    def _become(self, state: int) -> None:
        before, self.state = self.state, state
        if before != state and self._listener is not None:
            self._listener(self, before, state)

    def __repr__(self) -> str:
        return (
            f"Circuit({STATES[self.state]}, failures={self._failures}, "
            f"cool_down={self._cool_down:g}s)"
        )
