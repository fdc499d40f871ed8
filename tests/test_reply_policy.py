"""The reply policy (tokenlimit/_redis/replies.py), pure: no server, the clock passed in.

Each rule, the counters, the deadline, and the invariant every shell relies on: a call that may
have run is never sent again. The integration tests (test_limiter, test_cluster_changes,
test_sentinel, test_batching...) show the shells carrying the steps out against real servers.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.exceptions as rx
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenlimit._redis.replies as policy
from tokenlimit import BackendError
from tokenlimit._redis.replies import (
    MAX_REDIRECTS,
    TRYAGAIN_PAUSE,
    Ask,
    CallState,
    Done,
    DropAndFail,
    Fail,
    Failed,
    Moved,
    NoReply,
    NoScript,
    Outcome,
    Pause,
    ReadOnly,
    Redirect,
    Replied,
    Resend,
    Step,
    TryAgain,
    classify,
    next_step,
    outcome_of,
)
from tokenlimit._redis.resp import ReplyError

DEADLINE = 10.0
NOW = 1.0


def _error(exc: BaseException) -> BackendError:
    return classify(exc)


def _moved(slot: int = 3999, host: str = "10.0.0.2", port: int = 7001) -> Moved:
    error = _error(rx.MovedError(f"{slot} {host}:{port}"))
    return Moved(slot=slot, host=host, port=port, error=error)


def _ask(slot: int = 3999, host: str = "10.0.0.3", port: int = 7002) -> Ask:
    error = _error(rx.AskError(f"{slot} {host}:{port}"))
    return Ask(slot=slot, host=host, port=port, error=error)


def _noscript() -> NoScript:
    return NoScript(error=_error(rx.NoScriptError("NOSCRIPT No matching script.")))


def _tryagain() -> TryAgain:
    return TryAgain(error=_error(rx.TryAgainError("TRYAGAIN Multiple keys request")))


def _readonly() -> ReadOnly:
    return ReadOnly(error=_error(rx.ReadOnlyError("READONLY You can't write")))


def _failed() -> Failed:
    return Failed(error=_error(rx.ResponseError("ERR user_script:1: boom")))


def _noreply() -> NoReply:
    return NoReply(error=_error(rx.TimeoutError("no reply before the limiter's deadline")))


def _state(**changes: object) -> CallState:
    return dataclasses.replace(CallState(deadline=DEADLINE), **changes)  # type: ignore[arg-type]


# -- each rule --------------------------------------------------------------------------------
def test_a_reply_is_done() -> None:
    state = _state()
    assert next_step(Replied(reply=[1, 2]), state, NOW) == (Done(reply=[1, 2]), state)


def test_noscript_sends_the_body_once() -> None:
    step, state = next_step(_noscript(), _state(), NOW)
    assert step == Resend()
    assert state == _state(by_sha=False)
    again = _noscript()  # an EVAL cannot meet NOSCRIPT; if a server says so, it is an error
    assert next_step(again, state, NOW) == (Fail(error=again.error), state)


def test_noscript_on_a_call_that_names_no_script_fails() -> None:
    outcome = _noscript()
    step, _ = next_step(outcome, _state(by_sha=False), NOW)
    assert step == Fail(error=outcome.error)


def test_noscript_past_the_deadline_sends_nothing() -> None:
    step, state = next_step(_noscript(), _state(), DEADLINE)
    assert isinstance(step, Fail)
    assert step.error.reason == "timeout"
    assert state.by_sha


def test_moved_refreshes_the_slot_and_counts() -> None:
    step, state = next_step(_moved(), _state(), NOW)
    node = ("10.0.0.2", 7001)
    assert step == Redirect(node=node, slot=3999, asking=False, refresh_slot=True)
    assert state == _state(redirects=1)


def test_ask_sends_asking_to_the_node_and_counts() -> None:
    step, state = next_step(_ask(), _state(redirects=2), NOW)
    node = ("10.0.0.3", 7002)
    assert step == Redirect(node=node, slot=3999, asking=True, refresh_slot=False)
    assert state == _state(redirects=3)


@pytest.mark.parametrize("redirect", [_moved, _ask])
def test_at_most_max_redirects_are_followed(redirect: Callable[[], Moved | Ask]) -> None:
    state = _state()
    for _ in range(MAX_REDIRECTS):
        step, state = next_step(redirect(), state, NOW)
        assert isinstance(step, Redirect)
    outcome = redirect()
    step, _ = next_step(outcome, state, NOW)
    assert isinstance(step, Fail)
    assert step.error.reason == "cluster"
    assert "too many redirects" in str(step.error)
    assert step.error.__cause__ is outcome.error.__cause__


@pytest.mark.parametrize("redirect", [_moved, _ask])
def test_a_standalone_client_follows_no_redirect(redirect: Callable[[], Moved | Ask]) -> None:
    outcome = redirect()
    step, state = next_step(outcome, _state(cluster=False), NOW)
    assert isinstance(step, Fail)
    assert step.error.reason == "cluster"
    assert "redis+cluster://" in str(step.error)
    assert step.error.__cause__ is outcome.error.__cause__
    assert state == _state(cluster=False)


def test_a_redirect_at_the_deadline_fails_as_a_timeout() -> None:
    step, _ = next_step(_moved(), _state(), DEADLINE)
    assert isinstance(step, Fail)
    assert step.error.reason == "timeout"
    assert "redirected until the limiter's deadline" in str(step.error)
    assert isinstance(step.error.__cause__, rx.TimeoutError)


def test_tryagain_pauses_and_restarts_the_redirect_count() -> None:
    step, state = next_step(_tryagain(), _state(redirects=MAX_REDIRECTS), NOW)
    assert step == Pause(seconds=TRYAGAIN_PAUSE)
    assert state == _state(redirects=0)


@pytest.mark.parametrize("left", [TRYAGAIN_PAUSE, TRYAGAIN_PAUSE / 2, 0.0, -1.0])
def test_tryagain_without_time_for_a_pause_fails(left: float) -> None:
    outcome = _tryagain()
    step, _ = next_step(outcome, _state(), DEADLINE - left)
    assert isinstance(step, Fail)
    assert step.error.reason == "cluster"
    assert "mid-migration until the deadline" in str(step.error)
    assert step.error.__cause__ is outcome.error.__cause__


def test_readonly_drops_and_fails() -> None:
    outcome = _readonly()
    state = _state()
    assert next_step(outcome, state, NOW) == (DropAndFail(error=outcome.error), state)


@pytest.mark.parametrize("outcome", [_failed(), _noreply()], ids=["error", "no-reply"])
def test_anything_else_fails_with_its_own_error(outcome: Failed | NoReply) -> None:
    state = _state()
    step, after = next_step(outcome, state, NOW)
    assert step == Fail(error=outcome.error)
    assert step.error is outcome.error
    assert after == state


def test_steps_and_outcomes_are_frozen_values() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Pause(seconds=1.0).seconds = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Pause(1.0)  # type: ignore[misc]  # keyword-only
    assert Redirect(node=("h", 1), slot=1, asking=True, refresh_slot=False) == Redirect(
        node=("h", 1), slot=1, asking=True, refresh_slot=False
    )


# -- the classifier ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("NOSCRIPT No matching script. Please use EVAL.", NoScript),
        ("TRYAGAIN Multiple keys request during rehashing of slot", TryAgain),
        ("READONLY You can't write against a read only replica.", ReadOnly),
        ("ERR Error running script", Failed),
        ("OOM command not allowed when used memory > 'maxmemory'.", Failed),
        ("NOPERM this user has no permissions", Failed),
        ("CLUSTERDOWN The cluster is down", Failed),
    ],
)
def test_error_replies_read_by_resp_and_by_redis_py_mean_the_same(
    reply: str, kind: type[Outcome]
) -> None:
    lean = outcome_of(ReplyError(reply))
    driver = ReplyError(reply).exception()
    assert type(lean) is kind
    assert type(outcome_of(driver)) is kind
    wrapped = classify(driver)
    via_redis_py = outcome_of(wrapped)
    assert type(via_redis_py) is kind
    assert via_redis_py.error is wrapped  # the error raised is the one the shell had
    assert lean.error.reason == wrapped.reason
    assert type(lean.error.__cause__) is type(driver)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("MOVED 3999 10.0.0.2:7001", Moved),
        ("ASK 3999 10.0.0.2:7001", Ask),
        ("MOVED 16383 ::1:7005", Moved),  # an IPv6 host: the port is after the last colon
    ],
)
def test_redirects_carry_slot_and_node(reply: str, expected: type[Moved] | type[Ask]) -> None:
    for error in (ReplyError(reply), ReplyError(reply).exception()):
        outcome = outcome_of(error)
        assert type(outcome) is expected
        assert isinstance(outcome, (Moved, Ask))
        slot, node = reply.split(" ")[1:]
        host, port = node.rsplit(":", 1)
        assert (outcome.slot, outcome.host, outcome.port) == (int(slot), host, int(port))
        assert outcome.error.reason == "server"


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (rx.TimeoutError("no reply"), NoReply, "timeout"),
        (TimeoutError(), NoReply, "timeout"),
        (rx.ConnectionError("the server closed the connection"), NoReply, "connection"),
        (ConnectionResetError(), NoReply, "connection"),
        # redis-py's Sentinel connection turns READONLY into this (and closes itself).
        (rx.ConnectionError("The previous master is now a slave"), NoReply, "connection"),
        (rx.InvalidResponse("tokenlimit: unexpected reply 7"), Failed, "protocol"),
        (rx.SlotNotCoveredError("no node"), Failed, "cluster"),
        (rx.ClusterError("unknown node h:1"), Failed, "cluster"),
    ],
)
def test_failures_without_a_reply(error: BaseException, kind: type[Outcome], reason: str) -> None:
    for seen in (error, classify(error)):
        outcome = outcome_of(seen)
        assert type(outcome) is kind
        assert isinstance(outcome, (Failed, NoReply))
        assert outcome.error.reason == reason


def test_a_backend_error_without_a_cause_fails_as_it_is() -> None:
    error = BackendError("storage failed (timeout): no reply", reason="timeout")
    outcome = outcome_of(error)
    assert outcome == NoReply(error=error)


# -- the invariant, over random sequences of outcomes -----------------------------------------
def _may_have_run(outcome: Outcome) -> bool:
    """Told apart from the policy: only the five refusals say the call took nothing."""
    return not isinstance(outcome, (NoScript, Moved, Ask, TryAgain, ReadOnly))


_TERMINAL = (Done, Fail, DropAndFail)

outcomes = st.one_of(
    st.builds(Replied, reply=st.lists(st.integers(), max_size=3)),
    st.builds(_noscript),
    st.builds(_moved, slot=st.integers(0, 16383)),
    st.builds(_ask, slot=st.integers(0, 16383)),
    st.builds(_tryagain),
    st.builds(_readonly),
    st.builds(_failed),
    st.builds(_noreply),
)


@settings(max_examples=500, deadline=None)
@given(
    script=st.lists(st.tuples(outcomes, st.floats(0.0, 0.05)), min_size=1, max_size=60),
    timeout=st.floats(0.0, 0.5),
    by_sha=st.booleans(),
)
def test_a_call_that_may_have_run_is_never_sent_again(
    script: list[tuple[Outcome, float]], timeout: float, by_sha: bool
) -> None:
    """A shell that sends once per step the policy gives, meeting ``script``'s outcomes in turn,
    the clock moving on by each gap (and each pause): at most one attempt may have run the
    call, and it is the last one; no step sends after the deadline; the body goes at most once,
    and only after NOSCRIPT; redirects between two TRYAGAINs never pass MAX_REDIRECTS."""
    now = 0.0
    state = CallState(deadline=timeout, by_sha=by_sha)
    attempts: list[Outcome] = []
    steps: list[Step] = []
    for outcome, gap in script:
        attempts.append(outcome)  # the attempt the previous step asked for
        step, after = next_step(outcome, state, now)
        steps.append(step)
        if isinstance(step, _TERMINAL):
            break
        assert not _may_have_run(outcome), (outcome, step)
        assert now < state.deadline, step  # nothing is sent once the deadline has passed
        if isinstance(step, Resend):
            assert isinstance(outcome, NoScript)
            assert state.by_sha
            assert not after.by_sha
        elif isinstance(step, Redirect):
            assert isinstance(outcome, (Moved, Ask))
            assert after.redirects == state.redirects + 1 <= MAX_REDIRECTS
        else:
            assert isinstance(step, Pause)
            assert isinstance(outcome, TryAgain)
            assert now + step.seconds < state.deadline
            now += step.seconds
        assert after.deadline == state.deadline
        state = after
        now += gap
    ran = [outcome for outcome in attempts if _may_have_run(outcome)]
    assert len(ran) <= 1
    if ran:
        assert attempts[-1] is ran[0]
        assert isinstance(steps[-1], _TERMINAL)
    assert sum(isinstance(step, Resend) for step in steps) <= int(by_sha)


def test_redirected_forever_ends_after_max_redirects() -> None:
    state = CallState(deadline=DEADLINE)
    for attempt in range(1, 100):
        step, state = next_step(_moved() if attempt % 2 else _ask(), state, NOW)
        if not isinstance(step, Redirect):
            break
    assert isinstance(step, Fail)
    assert attempt == MAX_REDIRECTS + 1


def test_tryagain_forever_ends_at_the_deadline() -> None:
    """TRYAGAIN restarts the redirect count, so only the deadline ends it: the pauses do."""
    deadline = 0.105
    state, now, attempts = CallState(deadline=deadline), 0.0, 0
    while True:
        attempts += 1
        step, state = next_step(_ask() if attempts % 3 else _tryagain(), state, now)
        if isinstance(step, Pause):
            now += step.seconds
        elif not isinstance(step, Redirect):
            break
    assert isinstance(step, Fail)
    assert step.error.reason == "cluster"
    assert now <= deadline < now + 2 * TRYAGAIN_PAUSE


# -- pure -------------------------------------------------------------------------------------
def test_the_policy_module_does_no_io() -> None:
    """Nothing in it can touch a socket, a clock or a loop: it imports values, not IO."""
    tree = ast.parse(Path(policy.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported == {
        "__future__",
        "dataclasses",
        "typing",
        "redis",
        "tokenlimit._errors",
        ".resp",
    }
