"""The server changing under a running limiter: the script cache lost (SCRIPT FLUSH, a restart,
one cluster node flushed), a slot resharded, a master failed over to its replica, and a replica
answering READONLY.

What must hold throughout: every decision returns within the limiter's deadline, decided or
failed by the failure mode (closed: ``BackendError``; open: admitted), never refused because
of a storage fault; MOVED, ASK and TRYAGAIN are absorbed; no more is admitted than the policy
allows, except what Redis itself loses in a failover, which is measured and printed (``-s``).

The cluster tests run on a cluster of their own with replicas (``cluster_ops``), started for
this module and stopped after it, one per server flavour.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from cluster_ops import ReplicatedCluster
from conftest import Target
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from servers import Server, available_binaries, free_port
from tokenlimit import AsyncRateLimiter, BackendError, Decision, Limit, RateLimiter
from tokenlimit._request import build_request

FLAVOURS = sorted(available_binaries())
PREFIX = "tl:"
TIMEOUT = 0.5  # the limiter's deadline (the default)
MARGIN = 0.5  # scheduling on a loaded 2-core machine running six servers
BOUND = TIMEOUT + MARGIN
NEVER = 1e-6  # tokens per second: nothing refills during a test (one token per 11 days)
KINDS = ["sync-url", "sync-client", "async-url", "async-client"]

REPORT: list[str] = []  # measured numbers, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if REPORT:
        print("\ncluster changes, measured:")
        for line in REPORT:
            print(f"  {line}")


# -- a limiter of each kind -------------------------------------------------------------------
def sync_limiter(kind: str, url: str, nodes: list[tuple[str, int]], **options: Any) -> Any:
    """``sync-url``: from_url; ``sync-client``: over a user's client with redis-py's defaults.
    Returns ``(limiter, close)``."""
    options.setdefault("timeout", TIMEOUT)
    if kind == "sync-url":
        limiter = RateLimiter.from_url(url, **options)
        return limiter, limiter.close
    if url.startswith("redis+cluster://"):
        client: Any = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes])
    else:
        client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, **options)

    def close() -> None:
        limiter.close()
        client.close()

    return limiter, close


async def async_limiter(kind: str, url: str, nodes: list[tuple[str, int]], **options: Any) -> Any:
    """The async twins of ``sync_limiter``; returns ``(limiter, aclose)``."""
    options.setdefault("timeout", TIMEOUT)
    if kind == "async-url":
        limiter = AsyncRateLimiter.from_url(url, **options)
        return limiter, limiter.aclose
    if url.startswith("redis+cluster://"):
        startup = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in nodes]
        client: Any = redis.asyncio.cluster.RedisCluster(startup_nodes=startup)
    else:
        client = redis.asyncio.Redis.from_url(url)
    limiter = AsyncRateLimiter(client, **options)

    async def aclose() -> None:
        await limiter.aclose()
        await client.aclose()

    return limiter, aclose


# -- decisions running while the cluster changes ----------------------------------------------
# A limiter's first call discovers the cluster and connects inside its 0.5 s deadline; with
# several limiters starting at once on a loaded 2-core CI machine that can miss, so the calls
# that warm them up (not the ones measured) may try again.
WARM_TRIES, WARM_PAUSE = 30, 0.25


def _warm(call: Callable[[], Any]) -> None:
    for attempt in range(WARM_TRIES):
        try:
            call()
            return
        except BackendError:
            if attempt == WARM_TRIES - 1:
                raise
            time.sleep(WARM_PAUSE)


@dataclass(frozen=True)
class Call:
    kind: str
    bucket: int  # the index of its (identity, limits) in Load.buckets
    started: float  # time.monotonic()
    elapsed: float
    decision: Decision | None  # None: BackendError
    reason: str = ""


@dataclass
class Load:
    """Decisions from every kind of limiter at once, each kind in its own thread (the async
    ones on their own event loop), one call every ``pace`` seconds per caller, each caller
    going round ``buckets`` (identity, limits), until ``stop()``. Every call is recorded with
    its latency and outcome."""

    url: str
    nodes: list[tuple[str, int]]
    buckets: list[tuple[str, Any]]
    failure_mode: str = "closed"
    pace: float = 0.002
    tasks: int = 2  # concurrent callers per async limiter
    calls: list[Call] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # anything but BackendError
    messages: Counter[str] = field(default_factory=Counter)  # BackendErrors, by message
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _ready: threading.Barrier | None = None

    def __enter__(self) -> Load:
        self._ready = threading.Barrier(len(KINDS) + 1)
        for kind in KINDS:
            body = self._sync if kind.startswith("sync") else self._async
            thread = threading.Thread(target=body, args=(kind,), daemon=True)
            self._threads.append(thread)
            thread.start()
        try:
            self._ready.wait(30)
        except threading.BrokenBarrierError:  # a caller failed to start: say why
            raise AssertionError(f"a caller failed to start: {self.errors!r}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a decision never returned"
        assert not self.errors, self.errors

    def _record(
        self, kind: str, bucket: int, started: float, outcome: Decision | BackendError
    ) -> None:
        elapsed = time.monotonic() - started
        if isinstance(outcome, BackendError):
            self.messages[str(outcome)[:90]] += 1
            self.calls.append(Call(kind, bucket, started, elapsed, None, outcome.reason))
        else:
            self.calls.append(Call(kind, bucket, started, elapsed, outcome))

    def _sync(self, kind: str) -> None:
        try:
            limiter, close = sync_limiter(
                kind, self.url, self.nodes, failure_mode=self.failure_mode
            )
            try:
                for identity, limits in self.buckets:  # connected, scripts loaded
                    _warm(functools.partial(limiter.peek, identity, limits))
                assert self._ready is not None
                self._ready.wait(30)
                turn = 0
                while not self._stop.is_set():
                    bucket = turn % len(self.buckets)
                    turn += 1
                    started = time.monotonic()
                    try:
                        outcome: Decision | BackendError = limiter.try_acquire(
                            *self.buckets[bucket]
                        )
                    except BackendError as error:
                        outcome = error
                    self._record(kind, bucket, started, outcome)
                    time.sleep(self.pace)
            finally:
                close()
        except BaseException as exc:
            self.errors.append(exc)
            if self._ready is not None:
                self._ready.abort()

    def _async(self, kind: str) -> None:
        async def caller(limiter: AsyncRateLimiter, turn: int) -> None:
            while not self._stop.is_set():
                bucket = turn % len(self.buckets)
                turn += 1
                started = time.monotonic()
                try:
                    outcome: Decision | BackendError = await limiter.try_acquire(
                        *self.buckets[bucket]
                    )
                except BackendError as error:
                    outcome = error
                self._record(kind, bucket, started, outcome)
                await asyncio.sleep(self.pace)

        async def main() -> None:
            limiter, aclose = await async_limiter(
                kind, self.url, self.nodes, failure_mode=self.failure_mode
            )
            try:
                for identity, limits in self.buckets:
                    for attempt in range(WARM_TRIES):
                        try:
                            await limiter.peek(identity, limits)
                            break
                        except BackendError:
                            if attempt == WARM_TRIES - 1:
                                raise
                            await asyncio.sleep(WARM_PAUSE)
                assert self._ready is not None
                await asyncio.to_thread(self._ready.wait, 30)
                await asyncio.gather(*(caller(limiter, i) for i in range(self.tasks)))
            finally:
                await aclose()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.errors.append(exc)
            if self._ready is not None:
                self._ready.abort()

    # -- reading the record -------------------------------------------------------------------
    def admitted(self, bucket: int | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.decision is not None and c.decision.allowed and bucket in (None, c.bucket)
        ]

    def failed(self) -> list[Call]:
        return [c for c in self.calls if c.decision is None]

    def worst(self) -> float:
        return max(c.elapsed for c in self.calls)


def check_deadlines(load: Load, label: str) -> None:
    worst = load.worst()
    REPORT.append(f"{label}: {len(load.calls)} decisions, worst latency {worst:.3f}s")
    late = [c for c in load.calls if c.elapsed > BOUND]
    assert not late, f"{label}: {len(late)} decisions over {BOUND}s, worst {worst:.3f}s"


def check_failures(load: Load, label: str, allowed: set[str]) -> None:
    """Failures only of the kinds this change can cause (closed mode)."""
    reasons = Counter(c.reason for c in load.failed())
    if reasons:
        by_kind = Counter(f"{c.kind}:{c.bucket}:{c.reason}" for c in load.failed())
        REPORT.append(f"{label}: failed decisions {dict(sorted(by_kind.items()))}")
        REPORT.append(f"{label}: errors {dict(load.messages.most_common(4))}")
    assert set(reasons) <= allowed, f"{label}: unexpected failures {REPORT[-2:]}"


def count_tokens(
    load: Load, burst: int, remaining_now: int, bucket: int = 0
) -> tuple[int, int, int]:
    """``(lost, unreported, handed out)`` for a single-limit, cost-1 load on a bucket that
    never refills. Each admission reports the tokens left after it, so the server's count is
    a strictly falling sequence: a value reported twice is a token handed out twice (a write
    the server lost), a value never reported is a token taken for a call that failed (its
    script ran but the reply never came back)."""
    seen = Counter(c.decision.remaining for c in load.admitted(bucket) if c.decision is not None)
    lost = sum(n - 1 for n in seen.values())
    taken = burst - remaining_now  # tokens the server finally holds as consumed
    unreported = taken - len(seen)
    return lost, unreported, taken


def slot_of(identity: str, limit: Limit) -> int:
    return int(key_slot(build_request(PREFIX, identity, limit).keys[0].encode()))


def identity_on(cluster: ReplicatedCluster, port: int, limit: Limit, label: str) -> str:
    """An identity whose bucket lives on the master at ``port``."""
    for i in range(100_000):
        identity = f"{label}-{i}"
        if cluster.owner(slot_of(identity, limit)) == port:
            return identity
    raise AssertionError("no identity found")  # pragma: no cover


def errorstats(admin: redis.Redis) -> Counter[str]:
    """Error replies the server sent, by code (``INFO errorstats``)."""
    stats = admin.info("errorstats")
    return Counter({k.removeprefix("errorstat_"): int(v["count"]) for k, v in stats.items()})


# -- 4: the script cache lost ----------------------------------------------------------------
def script_counts(admin: redis.Redis) -> Counter[str]:
    """Scripts run, EVALSHA refused (NOSCRIPT), and EVAL sent, on one server."""
    stats = admin.info("commandstats")
    evalsha, eval_ = stats.get("cmdstat_evalsha", {}), stats.get("cmdstat_eval", {})
    noscript = int(evalsha.get("failed_calls", 0))
    return Counter(
        ran=int(evalsha.get("calls", 0)) - noscript + int(eval_.get("calls", 0)),
        noscript=noscript,
        eval=int(eval_.get("calls", 0)),
    )


def decide_in_turn(
    kind: str,
    url: str,
    nodes: list[tuple[str, int]],
    steps: list[Callable[[], None] | str],
    limit: Limit,
) -> list[int]:
    """Run ``steps`` with one limiter of ``kind``: an identity (str) is a ``try_acquire`` on it,
    recorded as its ``remaining`` (-1: refused); a callable is run in between (a flush, a
    restart) with the limiter idle. An async limiter's loop stays blocked while it runs.
    Without overrides: a test may count the scripts each node ran, and the overrides read (a
    script, once a second) is none of these decisions'."""
    out: list[int] = []
    if kind.startswith("sync"):
        limiter, close = sync_limiter(kind, url, nodes, timeout=5.0, overrides=False)
        try:
            for step in steps:
                if callable(step):
                    step()
                else:
                    d = limiter.try_acquire(step, limit)
                    out.append(d.remaining if d.allowed else -1)
        finally:
            close()
        return out

    async def main() -> None:
        limiter, aclose = await async_limiter(kind, url, nodes, timeout=5.0, overrides=False)
        try:
            for step in steps:
                if callable(step):
                    step()
                else:
                    d = await limiter.try_acquire(step, limit)
                    out.append(d.remaining if d.allowed else -1)
        finally:
            await aclose()

    asyncio.run(main())
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_script_flush_then_every_call_succeeds(target: Target, kind: str) -> None:
    """``SCRIPT FLUSH`` on every primary between two calls: the next call reloads the script
    and decides, for limiters from a URL and over a user's client, sync and async."""
    limit = Limit(NEVER, 5)
    identities = [f"flush-{i}" for i in range(12)]  # every primary of the cluster serves some

    def flush() -> None:
        for host, port in target.host_ports():
            with redis.Redis(host=host, port=port) as admin:
                admin.script_flush()

    steps: list[Callable[[], None] | str] = [*identities, flush, *identities, flush, identities[0]]
    out = decide_in_turn(kind, target.url, target.host_ports(), steps, limit)
    assert out == [4] * 12 + [3] * 12 + [2]


@pytest.mark.parametrize("kind", KINDS)
def test_one_cluster_node_loses_its_scripts(cluster: Target, kind: str) -> None:
    """The scripts of ONE cluster master are flushed: the calls on its slots reload the script
    there, once, and the other masters never see a NOSCRIPT."""
    limit = Limit(NEVER, 5)
    with RedisCluster(startup_nodes=cluster.startup_nodes()) as client:
        owner: dict[str, str] = {}
        for i in range(200):
            key = build_request(PREFIX, f"one-{i}", limit).keys[0]
            owner.setdefault(client.get_node_from_key(key).name, f"one-{i}")
    assert len(owner) == 3
    identities = list(owner.values())
    flushed = next(iter(owner))
    admins = {name: redis.Redis.from_url(f"redis://{name}") for name in owner}
    try:
        steps: list[Callable[[], None] | str] = [*identities, admins[flushed].script_flush]
        before: dict[str, Counter[str]] = {}
        steps.append(lambda: before.update({n: script_counts(a) for n, a in admins.items()}))
        steps += [*identities, *identities]
        out = decide_in_turn(kind, cluster.url, cluster.host_ports(), steps, limit)
        delta = {n: script_counts(a) - before[n] for n, a in admins.items()}
    finally:
        for admin in admins.values():
            admin.close()
    assert out == [4] * 3 + [3] * 3 + [2] * 3
    assert delta[flushed] == Counter(ran=2, noscript=1, eval=1)  # reloaded once, then EVALSHA
    for name in owner:
        if name != flushed:
            assert delta[name] == Counter(ran=2), name


@pytest.mark.parametrize("kind", KINDS)
def test_restart_then_the_next_call_succeeds(own_server: Server, kind: str) -> None:
    """The server restarts between two calls (scripts and data gone, every pooled connection
    closed by the server): the next call finds its connection closed before sending, opens
    another, reloads the script and decides. For an async limiter the restart happens while
    its event loop is blocked, so the loop has not yet seen the connections close."""
    steps: list[Callable[[], None] | str] = ["restart", own_server.restart, "restart", "restart"]
    out = decide_in_turn(kind, own_server.url, [], steps, Limit(NEVER, 5))
    assert out == [4, 4, 3]  # without persistence the bucket is gone too: full again


@pytest.mark.parametrize("kind", ["async-url", "async-client"])
def test_restart_while_the_loop_runs(own_server: Server, kind: str) -> None:
    """As in a live service: the loop keeps running while the server goes away and comes back."""
    limit = Limit(NEVER, 5)

    async def main() -> list[int]:
        limiter, aclose = await async_limiter(kind, own_server.url, [], timeout=5.0)
        try:
            out = [(await limiter.try_acquire("restart", limit)).remaining]
            await asyncio.to_thread(own_server.restart)
            await asyncio.sleep(0.05)
            for _ in range(2):
                out.append((await limiter.try_acquire("restart", limit)).remaining)
            return out
        finally:
            await aclose()

    assert asyncio.run(main()) == [4, 4, 3]


# -- the replicated cluster -------------------------------------------------------------------
@pytest.fixture(scope="module", params=FLAVOURS)
def replicated(request: pytest.FixtureRequest) -> Iterator[ReplicatedCluster]:
    """Three masters with a replica each, of one flavour, for this module only."""
    cluster = ReplicatedCluster(available_binaries()[request.param]).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh(replicated: ReplicatedCluster) -> ReplicatedCluster:
    """The replicated cluster, settled and empty."""
    replicated.wait_settled()
    replicated.flushall()
    return replicated


def nodes_of(cluster: ReplicatedCluster) -> list[tuple[str, int]]:
    return [("127.0.0.1", port) for port in cluster.ports]


def peek_remaining(cluster: ReplicatedCluster, identity: str, limit: Limit) -> int:
    with RateLimiter.from_url(cluster.url, timeout=5.0) as limiter:
        return limiter.peek(identity, limit).remaining


# -- 5a: resharding the bucket's slot ---------------------------------------------------------
def identity_in_slot(slot: int, limit: Limit, label: str) -> str:
    """An identity whose buckets hash to ``slot``."""
    for i in range(1_000_000):
        if slot_of(f"{label}-{i}", limit) == slot:
            return f"{label}-{i}"
    raise AssertionError("no identity found")  # pragma: no cover


@pytest.mark.slow
@pytest.mark.cluster
def test_resharding_the_slot_while_deciding(fresh: ReplicatedCluster) -> None:
    """The slot of two buckets moves to another master, one key at a time, while every kind of
    limiter decides on both: ASK once a key has moved, TRYAGAIN while a call's keys are split
    between the nodes, MOVED after. Every redirect is absorbed (no decision fails), every
    decision keeps its deadline, and nothing is admitted beyond the policy: on a bucket that
    never refills, each token is handed out once and every token taken was reported; on one
    that refills (two limits, so two keys), no more than its burst plus its refill."""
    counted = Limit(NEVER, 100_000)  # never runs dry: every admission is a distinct token
    rate, burst = 40.0, 10
    paced = [Limit(rate, burst), Limit(2 * rate, 3 * burst, name="wide")]  # refused often
    source, target = fresh.masters_ports()[:2]
    first = identity_on(fresh, source, counted, "reshard")
    slot = slot_of(first, counted)
    second = identity_in_slot(slot, paced[0], "reshard-paced")
    before = {p: errorstats(fresh.admin(p)) for p in (source, target)}
    buckets: list[tuple[str, Any]] = [(first, counted), (second, paced)]
    with Load(fresh.url, nodes_of(fresh), buckets, pace=0.004) as load:
        time.sleep(0.3)
        moved = fresh.migrate_slot(slot, target, pause=0.05)
        time.sleep(0.4)
    assert moved >= 1  # the paced keys may move by expiring and being written anew via ASK
    label = f"reshard ({fresh.binary.rsplit('/', 1)[-1]})"
    check_deadlines(load, label)
    # The one-key bucket: every redirect absorbed, nothing failed. The two-key one may fail by
    # the failure mode: once one of its keys has moved and the other expires on the source
    # (a refilled bucket's key does), the pair is split until the whole slot has moved, and
    # the nodes answer TRYAGAIN all that while (Redis Cluster's rule); past the deadline the
    # call fails. Real resharding tools move a slot in milliseconds; this one takes pauses.
    check_failures(load, label, {"timeout", "cluster"})
    assert [c for c in load.failed() if c.bucket == 0] == []
    assert fresh.owner(slot) == target
    lost, unreported, taken = count_tokens(
        load, counted.burst, peek_remaining(fresh, first, counted)
    )
    assert (lost, unreported) == (0, 0)
    assert taken == len(load.admitted(0))
    mine = [c for c in load.calls if c.bucket == 1]
    window = max(c.started + c.elapsed for c in mine) - min(c.started for c in mine)
    allowed = burst + rate * window
    admitted = len(load.admitted(1))
    assert len(mine) > admitted  # refusals too: the policy was put to the test
    assert admitted <= allowed + 1  # + 1: the server's slack of a token interval
    redirects = {p: errorstats(fresh.admin(p)) - before[p] for p in (source, target)}
    REPORT.append(
        f"{label}: {taken} tokens taken and reported once each; paced bucket {admitted} "
        f"admitted of {len(mine)}, policy allows {allowed:.0f}; error replies {redirects}"
    )
    assert redirects[source]["ASK"] > 0
    assert redirects[source]["MOVED"] > 0
    assert redirects[source]["TRYAGAIN"] + redirects[target]["TRYAGAIN"] > 0
    for kind in KINDS:  # every kind went on deciding on the new owner
        assert max(c.started for c in load.calls if c.kind == kind and c.decision) > 0


# -- 5b: failover to the replica --------------------------------------------------------------
@dataclass
class Failover:
    """What one failover under load did."""

    load: Load
    started: float  # when the failover began (the hang, or the command)
    promoted: float  # seconds until the replica said it was master
    burst: int
    remaining: int  # the bucket's tokens afterwards, read on the new master


def _failover_under_load(cluster: ReplicatedCluster, mode: str) -> Failover:
    """Run a load on a bucket of the first master, fail that master over to its replica
    (``mode``: ``coordinated``, ``takeover`` of a live master, ``hung``: takeover from a
    SIGSTOPped one), keep the load running until every kind decides again."""
    burst = 100_000
    limit = Limit(NEVER, burst)
    master = cluster.masters_ports()[0]
    replica = cluster.replica_of(master)
    identity = identity_on(cluster, master, limit, "failover")
    options = () if mode == "coordinated" else ("TAKEOVER",)
    with Load(cluster.url, nodes_of(cluster), [(identity, limit)]) as load:
        time.sleep(0.5)
        started = time.monotonic()
        if mode == "hung":
            with cluster.paused(master):
                time.sleep(0.2)  # decisions in flight and new ones hang on the old master
                cluster.failover(replica, *options)
                promoted = time.monotonic() - started
                # Resumed while the old master still hangs: it never redirects anyone.
                _wait_resumed(load, started, RESUME_WITHIN)
        else:
            cluster.failover(replica, *options)
            promoted = time.monotonic() - started
            _wait_resumed(load, started, RESUME_WITHIN)
        time.sleep(0.3)
    cluster.wait_settled()
    assert cluster.owner(slot_of(identity, limit)) == replica
    return Failover(load, started, promoted, burst, peek_remaining(cluster, identity, limit))


RESUME_WITHIN = 5.0  # seconds from the failover's start until every kind decides again


def _wait_resumed(load: Load, since: float, within: float) -> None:
    deadline = since + within
    while waiting := _not_resumed(load, since):
        assert time.monotonic() < deadline, f"{waiting} not deciding again after {within}s"
        time.sleep(0.02)


def _not_resumed(load: Load, since: float) -> list[str]:
    """The kinds whose last 20 decisions did not all succeed, or did not all start after
    ``since``."""
    by_kind: dict[str, list[Call]] = {kind: [] for kind in KINDS}
    for call in list(load.calls):
        by_kind[call.kind].append(call)
    waiting = []
    for kind, calls in by_kind.items():
        tail = calls[-20:]
        if len(tail) < 20 or tail[0].started < since or any(c.decision is None for c in tail):
            waiting.append(kind)
    return waiting


def _measure(label: str, run: Failover) -> tuple[int, int]:
    """Report the failover's numbers; returns ``(lost, unreported)`` tokens."""
    load = run.load
    check_deadlines(load, label)
    lost, unreported, _ = count_tokens(load, run.burst, run.remaining)
    failed = load.failed()
    # Decisions stopped from the failover's start until the end of the last failed one.
    stopped = max((c.started + c.elapsed for c in failed), default=run.started) - run.started
    REPORT.append(
        f"{label}: replica promoted after {run.promoted:.2f}s; {len(load.admitted())} admitted, "
        f"{len(failed)} failed; decisions failing for {stopped:.2f}s; tokens handed out twice "
        f"(a write the old master acknowledged and lost) {lost}; tokens taken without an "
        f"admission (a failed call that ran) {unreported}"
    )
    assert unreported >= 0
    assert unreported <= len(failed)  # only a failed call takes a token without a report
    return lost, unreported


@pytest.mark.slow
@pytest.mark.cluster
def test_failover_while_deciding(fresh: ReplicatedCluster) -> None:
    """``CLUSTER FAILOVER`` on the replica of the bucket's master: the old master pauses its
    clients, the replica catches up and takes over, and the old one answers MOVED. Decisions
    keep their deadline, resume on the new master without a restart, and lose nothing: a
    coordinated failover waits for the replica to have every acknowledged write."""
    label = f"coordinated failover ({fresh.binary.rsplit('/', 1)[-1]})"
    run = _failover_under_load(fresh, "coordinated")
    check_failures(run.load, label, {"timeout"})
    lost, _ = _measure(label, run)
    assert lost == 0


@pytest.mark.slow
@pytest.mark.cluster
def test_takeover_from_a_live_master(fresh: ReplicatedCluster) -> None:
    """``CLUSTER FAILOVER TAKEOVER``: the replica promotes itself without waiting for the
    master, which goes on acknowledging writes until it hears of the new epoch. Those writes
    are lost (Redis replication is asynchronous), so a token can be handed out twice: the
    number is measured and printed, not asserted beyond the deadline and the recovery."""
    label = f"takeover of a live master ({fresh.binary.rsplit('/', 1)[-1]})"
    run = _failover_under_load(fresh, "takeover")
    # After three timeouts the circuit breaker opens: calls then fail at once (circuit_open)
    # instead of each waiting out the deadline, until a probe reaches the new master.
    check_failures(run.load, label, {"timeout", "connection", "cluster", "circuit_open"})
    _measure(label, run)


@pytest.mark.slow
@pytest.mark.cluster
def test_takeover_from_a_hung_master(fresh: ReplicatedCluster) -> None:
    """The master hangs (SIGSTOP: its sockets stay open, nothing answers) and its replica takes
    over (``CLUSTER FAILOVER TAKEOVER``). No MOVED ever comes from the old master, so the
    limiter must find the new one by itself: decisions time out within the deadline while the
    master hangs, then resume on the new master with no process restart."""
    label = f"takeover of a hung master ({fresh.binary.rsplit('/', 1)[-1]})"
    run = _failover_under_load(fresh, "hung")
    # After three timeouts the circuit breaker opens: calls then fail at once (circuit_open)
    # instead of each waiting out the deadline, until a probe reaches the new master.
    check_failures(run.load, label, {"timeout", "connection", "cluster", "circuit_open"})
    _measure(label, run)


# -- 5c: READONLY -----------------------------------------------------------------------------
@pytest.fixture(params=FLAVOURS)
def replica(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A standalone server in the replica role (its master is a port nobody listens on): it
    answers every write with READONLY."""
    server = Server(available_binaries()[request.param]).start()
    try:
        with server.client() as admin:
            admin.replicaof("127.0.0.1", free_port())
        yield server
    finally:
        server.stop()


def _outcomes_on(url: str, failure_mode: str) -> dict[str, Decision | BackendError]:
    """One decision of each kind of limiter on ``url``."""
    limit = Limit(NEVER, 5)
    out: dict[str, Decision | BackendError] = {}
    for kind in KINDS[:2]:
        limiter, close = sync_limiter(kind, url, [], failure_mode=failure_mode)
        try:
            out[kind] = limiter.try_acquire("readonly", limit)
        except BackendError as error:
            out[kind] = error
        finally:
            close()

    async def main() -> None:
        for kind in KINDS[2:]:
            limiter, aclose = await async_limiter(kind, url, [], failure_mode=failure_mode)
            try:
                out[kind] = await limiter.try_acquire("readonly", limit)
            except BackendError as error:
                out[kind] = error
            finally:
                await aclose()

    asyncio.run(main())
    return out


def test_readonly_reply_is_a_storage_error(replica: Server) -> None:
    """A decision sent to a replica (a stale DNS name, a failed-over standalone pair): READONLY
    is a ``BackendError`` when closed and an admission when open, never a refusal."""
    for kind, outcome in _outcomes_on(replica.url, "closed").items():
        assert isinstance(outcome, BackendError), (kind, outcome)
        assert outcome.reason == "server"
        assert isinstance(outcome.__cause__, redis.exceptions.ReadOnlyError), kind
    for kind, outcome in _outcomes_on(replica.url, "open").items():
        assert isinstance(outcome, Decision), (kind, outcome)
        assert outcome.allowed, kind
