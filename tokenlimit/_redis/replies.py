"""What a Redis reply means for one call: the next step, decided here once for every shell.

A shell (sync or async, lean or through redis-py) sends the call, turns what came back into an
``Outcome`` (``outcome_of``), asks ``next_step`` and does the ``Step`` it returns, until Done or
failed: tenacity's shape, the policy decides and the shells only act. No IO; ``now`` is passed
in, on the clock of the deadline. Why each rule: docs/internals.md, "Redis replies".

Invariant: no step sends the call again once an attempt may have run it (reply, error, none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeAlias

from redis import exceptions as rx

from tokenlimit._errors import BackendError

from .resp import ReplyError

__all__ = [
    "MAX_REDIRECTS",
    "TRYAGAIN_PAUSE",
    "Ask",
    "CallState",
    "Done",
    "DropAndFail",
    "ErrorOutcome",
    "Fail",
    "Failed",
    "Moved",
    "NoReply",
    "NoScript",
    "Outcome",
    "Pause",
    "ReadOnly",
    "Redirect",
    "Replied",
    "Resend",
    "Step",
    "TryAgain",
    "classify",
    "next_step",
    "outcome_of",
]

MAX_REDIRECTS = 5  # MOVED/ASK followed per call, counted from its start or its last TRYAGAIN
TRYAGAIN_PAUSE = 0.01  # seconds between two tries of a call whose slot is mid-migration


# -- outcomes: what one attempt tells --------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Replied:
    """A reply that is not an error: the call ran."""

    reply: object


@dataclass(frozen=True, slots=True, kw_only=True)
class _Erred:
    """An attempt that ended in an error: ``error`` is what the call fails with if it ends here.
    Each kind below is a subclass (``__slots__ = ()``: frozen, no new attributes)."""

    error: BackendError


@dataclass(frozen=True, slots=True, kw_only=True)
class _Redirected(_Erred):
    """A cluster node refused the call and named the node that serves its slot."""

    slot: int
    host: str
    port: int


class NoScript(_Erred):
    """NOSCRIPT: the server does not know the script's SHA1, so it did not run."""

    __slots__ = ()


class Moved(_Redirected):
    """MOVED: the slot is served by another node now; the call did not run."""

    __slots__ = ()


class Ask(_Redirected):
    """ASK: the slot is migrating and the key is on the importing node; the call did not run."""

    __slots__ = ()


class TryAgain(_Erred):
    """TRYAGAIN: the call's keys are split between the two nodes of a migrating slot; not run."""

    __slots__ = ()


class ReadOnly(_Erred):
    """READONLY: the server is a replica (likely a demoted primary); the call wrote nothing."""

    __slots__ = ()


class Failed(_Erred):
    """Every other error: an error reply (a script error may come after a write) or a failure
    the driver reported (no node for the slot, a bad reply). Never sent again."""

    __slots__ = ()


class NoReply(_Erred):
    """No reply: a timeout, or the connection lost or refused. The call may have run."""

    __slots__ = ()


ErrorOutcome: TypeAlias = NoScript | Moved | Ask | TryAgain | ReadOnly | Failed | NoReply
Outcome: TypeAlias = Replied | ErrorOutcome


# -- steps: what the shell does next ---------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Return ``reply``: the call ran."""

    reply: object


@dataclass(frozen=True, slots=True, kw_only=True)
class Resend:
    """Send the call again to the same node, with the script's body (EVAL) instead of its SHA1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    """Send the call to ``node``: after ``ASKING`` if ``asking``; after telling the client's slot
    map that ``node`` serves ``slot`` now if ``refresh_slot`` (then the map routes the call)."""

    node: tuple[str, int]
    slot: int
    asking: bool
    refresh_slot: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Pause:
    """Sleep ``seconds``, then send the call again to the node the slot map names for its key."""

    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DropAndFail:
    """Close the idle connections to the server that answered (the next connection looks for
    the primary again), then raise ``error``."""

    error: BackendError


@dataclass(frozen=True, slots=True, kw_only=True)
class Fail:
    """Raise ``error``."""

    error: BackendError


Step: TypeAlias = Done | Resend | Redirect | Pause | DropAndFail | Fail

_RESEND = Resend()


@dataclass(frozen=True, slots=True, kw_only=True)
class CallState:
    """Where one call stands between two attempts."""

    deadline: float  # on the clock of ``next_step``'s ``now``
    by_sha: bool = True  # the call names a script by SHA1 (EVALSHA): a NOSCRIPT may be answered
    redirects: int = 0  # MOVED/ASK followed since the call began or last met TRYAGAIN
    cluster: bool = True  # the client can follow a redirect (a standalone one cannot)


def next_step(outcome: Outcome, state: CallState, now: float) -> tuple[Step, CallState]:
    """The step after ``outcome`` and the call's state for the attempt it leads to, if any.

    A step that sends again (Resend, Redirect, Pause) is given only with time left before the
    deadline, and only after an outcome that says the call did not run.
    """
    match outcome:
        case Replied(reply=reply):
            return Done(reply=reply), state
        case NoScript() if state.by_sha:
            if now >= state.deadline:
                return Fail(error=_late("no time left to send the script's body")), state
            return _RESEND, replace(state, by_sha=False)
        case _Redirected(error=error) if not state.cluster:
            wrong = "a cluster node answered a standalone client: use redis+cluster://"
            return Fail(error=_cluster(wrong, error)), state
        case _Redirected(slot=slot, host=host, port=port, error=error):
            redirects = state.redirects + 1
            if redirects > MAX_REDIRECTS:
                return Fail(error=_cluster("too many redirects", error)), state
            if now >= state.deadline:
                return Fail(error=_late("redirected until the limiter's deadline")), state
            moved = isinstance(outcome, Moved)
            redirect = Redirect(node=(host, port), slot=slot, asking=not moved, refresh_slot=moved)
            return redirect, replace(state, redirects=redirects)
        case TryAgain(error=error):
            if state.deadline - now <= TRYAGAIN_PAUSE:
                slow = "the slot stayed mid-migration until the deadline"
                return Fail(error=_cluster(slow, error)), state
            # Progress, not a redirect loop: the ASK that led here found the importing node.
            return Pause(seconds=TRYAGAIN_PAUSE), replace(state, redirects=0)
        case ReadOnly(error=error):
            return DropAndFail(error=error), state
        case NoScript(error=error) | Failed(error=error) | NoReply(error=error):
            return Fail(error=error), state


def outcome_of(error: BaseException) -> ErrorOutcome:
    """What the attempt that ended in ``error`` tells: an error reply read by ``_resp``
    (``ReplyError``), a ``BackendError`` wrapping redis-py's error, or redis-py's error."""
    cause: BaseException | None
    if isinstance(error, ReplyError):
        cause = error.exception()
        failure = classify(cause)
    elif isinstance(error, BackendError):
        cause, failure = error.__cause__, error
    else:
        cause, failure = error, classify(error)
    if isinstance(cause, rx.NoScriptError):
        return NoScript(error=failure)
    if isinstance(cause, rx.AskError):  # MOVED too: redis-py's MovedError is an AskError
        slot, host, port = int(cause.slot_id), str(cause.host), int(cause.port)
        if isinstance(cause, rx.MovedError):
            return Moved(slot=slot, host=host, port=port, error=failure)
        return Ask(slot=slot, host=host, port=port, error=failure)
    if isinstance(cause, rx.TryAgainError):
        return TryAgain(error=failure)
    if isinstance(cause, rx.ReadOnlyError):
        return ReadOnly(error=failure)
    if failure.reason in ("timeout", "connection"):
        return NoReply(error=failure)
    return Failed(error=failure)


def classify(exc: BaseException) -> BackendError:
    """Turn a driver error into a BackendError with a short reason."""
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):
        reason = "timeout"
    elif isinstance(exc, (rx.ConnectionError, OSError, ConnectionError)):
        reason = "connection"
    elif isinstance(exc, (rx.ClusterError, rx.ClusterDownError, rx.SlotNotCoveredError)):
        reason = "cluster"
    elif isinstance(exc, rx.ResponseError):
        reason = "server"
    else:
        reason = "protocol"
    error = BackendError(f"storage failed ({reason}): {exc}", reason=reason)
    error.__cause__ = exc
    return error


def _late(what: str) -> BackendError:
    return classify(rx.TimeoutError(what))


def _cluster(what: str, error: BackendError) -> BackendError:
    cause = error.__cause__
    failed = BackendError(f"storage failed (cluster): {what}: {cause}", reason="cluster")
    failed.__cause__ = cause
    return failed
