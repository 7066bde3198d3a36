"""The Store contract, run against both backends: MemoryStore (the reference) and RedisStore.

Every test that takes `store` runs twice, once per backend, and both must give the same
answers. The Redis tests talk to a real redis-server (tests/servers.py), one per module, each
test under a fresh key prefix; the Redis-only tests below them cover what memory cannot show:
fencing by lease, a dead owner's run declared lost, Redis down and back, Redis stalling, TTLs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from agent import (
    ATTACH,
    Lease,
    LeaseLost,
    MemoryStore,
    RunIdTaken,
    SeqOutOfRange,
    SessionBusy,
    Store,
    StoreUnavailable,
    Superseded,
    UnknownSession,
)
from protocol import ERR_AGENT_LOST, ERROR, FINAL, TOKEN, TOOL_CALL, dumps
from servers import RedisServer, start_redis
from store_redis import PENDING, RedisStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def new_prefix() -> str:
    return f"test{secrets.token_hex(4)}:"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each backend, empty. MemoryStore is made here, inside the test's event loop (it makes asyncio objects);
    redis-server starts only when a Redis case first runs."""
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    backend = RedisStore(server.url, prefix=new_prefix())
    yield backend
    await backend.close()


def token(lease: Lease, text: str) -> dict[str, str]:
    return {"run_id": lease.run_id, "text": text}


def call(call_id: str) -> dict[str, object]:
    return {"id": call_id, "name": "read_file", "arguments": {"path": call_id}}


async def start(store: Store, session_id: str = "s1", run_id: str = "r1") -> Lease:
    """A run as start_run opens it: open_run, then the run's own stream attaches."""
    lease = await store.open_run(session_id, run_id)
    await store.attach(session_id, lease.seq, f"att_{run_id}")
    return lease


async def finish(store: Store, lease: Lease) -> None:
    await store.append(lease, FINAL, {"run_id": lease.run_id, "status": "completed", "content": ""})


async def everything(store: Store, session_id: str = "s1", after: tuple[int, int] = (0, 0)) -> list[tuple[tuple[int, int], str, str]]:
    return [(e.pos, e.kind, e.data) for e in await store.read(session_id, after, 0)]


# ---------------------------------------------------------------------------------------------
# Both backends
# ---------------------------------------------------------------------------------------------


async def test_open_run_new_session_starts_at_seq_0(store: Store) -> None:
    """A new session's lease carries seq 0, the run and session ids, and a token."""
    lease = await store.open_run("s1", "r1")
    assert (lease.session_id, lease.run_id, lease.seq) == ("s1", "r1", 0)
    assert lease.token


async def test_second_run_while_one_holds_the_session_is_busy(store: Store) -> None:
    """SessionBusy names the run in progress; once it ends, the next run opens at the session's seq."""
    lease = await start(store)
    with pytest.raises(SessionBusy) as busy:
        await store.open_run("s1", "r2")
    assert busy.value.run_id == "r1"
    await store.append(lease, TOKEN, token(lease, "a"))
    await finish(store, lease)
    second = await store.open_run("s1", "r2")
    assert second.seq == 2


async def test_append_positions_seq_and_data(store: Store) -> None:
    """Notifications at (seq, 0) with "seq" in their data; a tool_call or marker at (seq, n>0)."""
    lease = await store.open_run("s1", "r1")
    await store.attach("s1", 0, "a1")
    size = await store.append(lease, TOKEN, token(lease, "héllo"))
    assert lease.seq == 1
    assert size == len('{"run_id":"r1","text":"héllo","seq":1}')
    await store.append(lease, TOOL_CALL, call("c1"))
    await store.append(lease, TOOL_CALL, call("c2"))
    await store.append(lease, TOKEN, token(lease, "b"))
    assert lease.seq == 2
    assert await everything(store) == [
        ((0, 1), ATTACH, '{"attach_id":"a1"}'),
        ((1, 0), TOKEN, '{"run_id":"r1","text":"héllo","seq":1}'),
        ((1, 1), TOOL_CALL, '{"id":"c1","name":"read_file","arguments":{"path":"c1"}}'),
        ((1, 2), TOOL_CALL, '{"id":"c2","name":"read_file","arguments":{"path":"c2"}}'),
        ((2, 0), TOKEN, '{"run_id":"r1","text":"b","seq":2}'),
    ]


async def test_tool_answer_first_wins(store: Store) -> None:
    """The first answer reaches the inbox ("ok"); a second to the same call is "answered"."""
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    assert await store.answer("r1", "c1", {"result": {"content": "x"}}) == "ok"
    assert await store.answer("r1", "c1", {"result": {"content": "y"}}) == "answered"
    assert await store.inbox(lease, 1) == [{"call_id": "c1", "outcome": {"result": {"content": "x"}}}]
    assert await store.inbox(lease, 0.05) == []


async def test_answer_after_expire_call_is_timed_out(store: Store) -> None:
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    await store.expire_call(lease, "c1")
    assert await store.answer("r1", "c1", {"result": 1}) == "timed out"
    assert await store.inbox(lease, 0.05) == []


async def test_answer_to_unknown_run_or_call(store: Store) -> None:
    """"no run" for a run never opened or already ended, "no call" for a call never made."""
    assert await store.answer("nope", "c1", {"result": 1}) == "no run"
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    assert await store.answer("r1", "c9", {"result": 1}) == "no call"
    await finish(store, lease)
    assert await store.answer("r1", "c1", {"result": 1}) == "no run"


async def test_cancel_reaches_the_inbox(store: Store) -> None:
    lease = await start(store)
    assert await store.cancel("r1") is True
    assert await store.inbox(lease, 1) == [{"cancel": True}]
    assert await store.cancel("nope") is False
    await finish(store, lease)
    assert await store.cancel("r1") is False


async def test_inbox_is_the_runs_own(store: Store) -> None:
    """A message the previous run never read does not reach the next run, even one with the same id."""
    first = await start(store)
    await store.cancel("r1")
    await finish(store, first)
    second = await store.open_run("s1", "r2")
    assert await store.inbox(second, 0.05) == []
    await store.cancel("r2")
    await finish(store, second)
    again = await store.open_run("s1", "r2")  # the same run id once more
    assert await store.inbox(again, 0.05) == []


async def test_inbox_waits_then_returns_nothing(store: Store) -> None:
    lease = await start(store)
    began = time.monotonic()
    assert await store.inbox(lease, 0.2) == []
    assert 0.15 <= time.monotonic() - began < 2


async def test_inbox_wakes_on_answer(store: Store) -> None:
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    waiting = asyncio.create_task(store.inbox(lease, 5))
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await store.answer("r1", "c1", {"error": {"code": "x", "message": "no"}})
    assert await waiting == [{"call_id": "c1", "outcome": {"error": {"code": "x", "message": "no"}}}]
    assert time.monotonic() - began < 1


async def test_attach_replays_from_last_seq_up_to_its_marker(store: Store) -> None:
    """start is (last_seq, 0): reading from it gives the events after last_seq, then our marker."""
    lease = await start(store)
    for text in "abc":
        await store.append(lease, TOKEN, token(lease, text))
    attachment = await store.attach("s1", 1, "a2")
    assert (attachment.start, attachment.run_id, attachment.last_seq, attachment.pending) == ((1, 0), "r1", 3, [])
    entries = await everything(store, after=attachment.start)
    assert [(pos, kind) for pos, kind, _ in entries] == [((2, 0), TOKEN), ((3, 0), TOKEN), ((3, 1), ATTACH)]
    assert entries[-1][2] == '{"attach_id":"a2"}'


async def test_attach_at_0_replays_the_whole_log(store: Store) -> None:
    lease = await start(store)
    await store.append(lease, TOKEN, token(lease, "a"))
    attachment = await store.attach("s1", 0, "a2")
    entries = await everything(store, after=attachment.start)
    assert [(pos, kind) for pos, kind, _ in entries] == [((0, 1), ATTACH), ((1, 0), TOKEN), ((1, 1), ATTACH)]


async def test_attach_lists_waiting_calls_oldest_first(store: Store) -> None:
    """Pending calls in the order they were made (not by id, nor a hash's order), answered ones left out."""
    lease = await start(store)
    # not in id order; and ids over 64 bytes, which Redis keeps in a real hash table, not in an ordered list
    made = [f"call_{n * 7919 % 1000:03d}_{'x' * 64}" for n in range(40)]
    for n, call_id in enumerate(made):
        await store.append(lease, TOOL_CALL, call(call_id))
        if n % 10 == 0:
            await store.append(lease, TOKEN, token(lease, call_id))
    for call_id in made[1::3]:
        assert await store.answer("r1", call_id, {"result": 1}) == "ok"
    attachment = await store.attach("s1", 4, "a2")
    waiting = [call_id for call_id in made if call_id not in made[1::3]]
    assert [json.loads(data)["id"] for data in attachment.pending] == waiting
    assert attachment.pending[0] == dumps(call(made[0]))


async def test_attach_with_no_run_in_progress(store: Store) -> None:
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    await finish(store, lease)
    attachment = await store.attach("s1", 0, "a2")
    assert (attachment.run_id, attachment.last_seq, attachment.pending) == (None, 1, [])


async def test_attach_unknown_session(store: Store) -> None:
    with pytest.raises(UnknownSession):
        await store.attach("nope", 0, "a1")


async def test_attach_ahead_of_the_session(store: Store) -> None:
    lease = await start(store)
    await store.append(lease, TOKEN, token(lease, "a"))
    with pytest.raises(SeqOutOfRange) as out:
        await store.attach("s1", 2, "a2")
    assert (out.value.too_old, out.value.last_seq) == (False, 1)


async def test_a_newer_attach_marker_reaches_the_first_reader(store: Store) -> None:
    """The first stream reads past its own marker and then sees the second stream's."""
    await start(store)
    first = await store.attach("s1", 0, "first")
    entries = await store.read("s1", first.start, 0)
    assert json.loads(entries[-1].data) == {"attach_id": "first"}
    await store.attach("s1", 0, "second")
    more = await store.read("s1", entries[-1].pos, 1)
    assert [(e.kind, json.loads(e.data)) for e in more] == [(ATTACH, {"attach_id": "second"})]


async def test_a_stale_reattach_cannot_take_the_session_back(store: Store) -> None:
    """A re-attach naming a stream that is no longer the session's holder is Superseded, and writes nothing."""
    lease = await start(store)
    await store.append(lease, TOKEN, token(lease, "a"))
    await store.attach("s1", 1, "att_newer")  # another socket resumed: it holds the session now
    with pytest.raises(Superseded):
        await store.attach("s1", 1, "att_stale", previous="att_r1")
    again = await store.attach("s1", 1, "att_newest", previous="att_newer")  # the holder's own re-attach works
    entries = await store.read("s1", again.start, 0)
    assert [json.loads(e.data)["attach_id"] for e in entries if e.kind == ATTACH] == ["att_newer", "att_newest"]


async def test_a_superseded_socket_cannot_open_a_run(store: Store) -> None:
    """open_run from a socket whose attach id is no longer the holder is Superseded; the holder's works."""
    lease = await start(store)
    await store.append(lease, FINAL, {"run_id": "r1", "status": "completed", "content": ""})
    await store.attach("s1", 0, "att_newer")
    with pytest.raises(Superseded):
        await store.open_run("s1", "r2", holder="att_r1")
    assert (await store.open_run("s1", "r3", holder="att_newer")).run_id == "r3"


async def test_a_run_id_in_use_by_another_session_is_taken(store: Store) -> None:
    await start(store, "s1", "r1")
    with pytest.raises(RunIdTaken):
        await store.open_run("s2", "r1")


async def test_read_blocks_until_an_append(store: Store) -> None:
    lease = await start(store)
    after = (await store.read("s1", (0, 0), 0))[-1].pos
    reading = asyncio.create_task(store.read("s1", after, 5))
    await asyncio.sleep(0.1)
    assert not reading.done()
    began = time.monotonic()
    await store.append(lease, TOKEN, token(lease, "now"))
    entries = await reading
    assert [(e.pos, e.kind) for e in entries] == [((1, 0), TOKEN)]
    assert time.monotonic() - began < 1


async def test_read_times_out_empty(store: Store) -> None:
    await start(store)
    after = (await store.read("s1", (0, 0), 0))[-1].pos
    began = time.monotonic()
    assert await store.read("s1", after, 0.2) == []
    assert 0.15 <= time.monotonic() - began < 2
    assert await store.read("s1", after, 0) == []


async def test_read_unknown_session(store: Store) -> None:
    with pytest.raises(UnknownSession):
        await store.read("nope", (0, 0), 0)


async def test_retention_keeps_the_current_and_previous_run(store: Store) -> None:
    """After three runs, the log starts after the first run's last entry; older Last-Event-IDs get 410."""
    one = await start(store, run_id="r1")  # marker (0,1), tokens 1 2, final 3
    await store.append(one, TOKEN, token(one, "a"))
    await store.append(one, TOKEN, token(one, "b"))
    await finish(store, one)
    two = await start(store, run_id="r2")  # its events come after (3,0): marker (3,1), token 4, final 5
    await store.append(two, TOKEN, token(two, "c"))
    await finish(store, two)
    three = await store.open_run("s1", "r3")  # drops everything up to run 2's start, (3, 0)
    assert three.seq == 5
    assert (await store.read("s1", (0, 0), 0))[0].pos == (3, 1)
    with pytest.raises(SeqOutOfRange) as out:
        await store.attach("s1", 2, "late")
    assert (out.value.too_old, out.value.oldest_seq, out.value.last_seq) == (True, 4, 5)
    attachment = await store.attach("s1", 3, "ok")
    entries = await store.read("s1", attachment.start, 0)
    assert [e.pos for e in entries] == [(3, 1), (4, 0), (5, 0), (5, 1)]
    with pytest.raises(SeqOutOfRange) as ahead:
        await store.attach("s1", 6, "ahead")
    assert (ahead.value.too_old, ahead.value.oldest_seq, ahead.value.last_seq) == (False, 4, 5)


async def test_retention_when_the_log_begins_at_a_marker(store: Store) -> None:
    """A log that begins at a marker (s, n > 0) holds seq s+1 onwards: s+1 is the oldest, and s is still a valid Last-Event-ID."""
    one = await start(store, run_id="r1")
    await finish(store, one)  # final at 1
    await store.attach("s1", 1, "late")  # marker (1, 1), the log's last entry: run 2's events come after it
    two = await start(store, run_id="r2")  # its own marker (1, 2)
    await store.append(two, TOKEN, token(two, "a"))
    await finish(store, two)  # token 2, final 3
    await store.open_run("s1", "r3")  # drops up to (1, 1)
    assert (await store.read("s1", (0, 0), 0))[0].pos == (1, 2)
    with pytest.raises(SeqOutOfRange) as out:
        await store.attach("s1", 0, "too-old")
    assert (out.value.too_old, out.value.oldest_seq) == (True, 2)
    assert (await store.attach("s1", 1, "just-in")).start == (1, 0)


async def test_history_appends_and_loads_in_order(store: Store) -> None:
    assert await store.load_history("s1") == []
    lease = await start(store)
    user = {"role": "user", "content": "fix the bug ✓"}
    step = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{}"}]
    await store.append_history(lease, [user])
    await store.append_history(lease, step)
    assert await store.load_history("s1") == [user, *step]


async def test_presence_counts_from_the_last_reader_leaving(store: Store) -> None:
    """0 while any stream is attached; then the time since the last one left."""
    await store.open_run("s1", "r1")
    await store.attach("s1", 0, "a1")
    await store.attach("s1", 0, "a2")
    await store.keep_attached("s1", "a1")
    assert await store.unattached_for("s1") == 0
    await asyncio.sleep(0.5)
    await store.detach("s1", "a1")
    assert await store.unattached_for("s1") == 0
    await store.detach("s1", "a2")
    await asyncio.sleep(0.2)
    assert 0.15 <= await store.unattached_for("s1") < 0.6  # since a2 left, not since the session began
    assert await store.unattached_for("nope") == 0


async def test_owner_alive_while_the_run_is_owned(store: Store) -> None:
    """A live owner is alive, and declare_lost then writes nothing."""
    lease = await start(store)
    assert await store.owner_alive("s1", "r1") is True
    before = await everything(store)
    await store.declare_lost("s1", "r1")
    assert await everything(store) == before
    await store.renew(lease)
    await store.append(lease, TOKEN, token(lease, "still mine"))


async def test_housekeeping(store: Store) -> None:
    await start(store)
    await store.sweep()
    assert await store.healthy() is True


# ---------------------------------------------------------------------------------------------
# Redis only
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def short_lease(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A RedisStore whose leases last 0.3 s, so that an owner can be outlived in a test."""
    backend = RedisStore(redis_server.url, prefix=new_prefix(), lease_s=0.3)
    yield backend
    await backend.close()


async def test_lost_lease_fences_every_owner_write(short_lease: RedisStore) -> None:
    """Paused past its lease, an owner's append, history, expire_call and renew raise LeaseLost and write nothing."""
    store = short_lease
    lease = await start(store)
    await store.append(lease, TOOL_CALL, call("c1"))
    await store.append_history(lease, [{"role": "user", "content": "hi"}])
    before = (await everything(store), await store.load_history("s1"))
    await asyncio.sleep(0.5)
    assert await store.owner_alive("s1", "r1") is False
    for write in (store.append(lease, TOKEN, token(lease, "late")), store.append(lease, FINAL, {"run_id": "r1"}),
                  store.append_history(lease, [{"role": "assistant", "content": "late"}]),
                  store.expire_call(lease, "c1"), store.renew(lease)):
        with pytest.raises(LeaseLost):
            await write
    assert (await everything(store), await store.load_history("s1")) == before
    assert await store.answer("r1", "c1", {"result": 1}) == "ok"  # expire_call was fenced: the call still waits


async def test_a_new_owner_fences_the_old_one(short_lease: RedisStore) -> None:
    """Once another run took the session, the old owner's writes and renewals fail: no plain SET brings its lease back."""
    store = short_lease
    old = await start(store)
    await asyncio.sleep(0.5)
    new = await store.open_run("s1", "r2")
    for write in (store.renew(old), store.append(old, TOKEN, token(old, "late")), store.append_history(old, [{"role": "user"}])):
        with pytest.raises(LeaseLost):
            await write
    await store.append(new, TOKEN, token(new, "mine"))
    assert [kind for _, kind, _ in await everything(store)] == [ATTACH, ERROR, TOKEN]


async def test_renew_keeps_the_lease(short_lease: RedisStore) -> None:
    store = short_lease
    lease = await start(store)
    for _ in range(6):
        await asyncio.sleep(0.1)
        await store.renew(lease)
    assert await store.owner_alive("s1", "r1") is True
    await store.append(lease, TOKEN, token(lease, "still mine"))


OWNER = """
import asyncio, sys
from agent import LeaseLost
from store_redis import RedisStore

async def main(url: str, prefix: str) -> None:
    store = RedisStore(url, prefix=prefix, lease_s=0.5)
    lease = await store.open_run("s1", "r1")
    await store.attach("s1", 0, "owner")

    async def renew() -> None:
        while True:
            await asyncio.sleep(0.15)
            await store.renew(lease)

    renewing = asyncio.create_task(renew())
    print("owning", flush=True)
    n = 0
    while not renewing.done():
        n += 1
        try:
            await store.append(lease, "token", {"run_id": "r1", "text": str(n)})
        except LeaseLost:
            break
        await asyncio.sleep(0.02)
    print("fenced", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_an_owner_paused_past_its_lease_writes_nothing_more(redis_server: RedisServer) -> None:
    """A real owner process, SIGSTOPped past its lease: the run is declared lost; after SIGCONT it is fenced."""
    prefix = new_prefix()
    owner = await asyncio.create_subprocess_exec(sys.executable, "-c", OWNER, redis_server.url, prefix,
                                                 cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    store = RedisStore(redis_server.url, prefix=prefix)
    try:
        assert await asyncio.wait_for(owner.stdout.readline(), 20) == b"owning\n"
        await asyncio.sleep(0.3)
        owner.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.8)  # past its 0.5 s lease
        assert await store.owner_alive("s1", "r1") is False
        await store.declare_lost("s1", "r1")
        owner.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(owner.stdout.readline(), 10) == b"fenced\n"
        entries = await store.read("s1", (0, 1), 0)
        kinds = [e.kind for e in entries]
        assert kinds[-1] == ERROR and set(kinds[:-1]) == {TOKEN} and len(kinds) > 5
        assert [e.pos for e in entries] == [(n, 0) for n in range(1, len(entries) + 1)]
        assert json.loads(entries[-1].data)["code"] == ERR_AGENT_LOST
    finally:
        if owner.returncode is None:
            owner.send_signal(signal.SIGCONT)
            owner.kill()
        await owner.wait()
        await store.close()


async def test_open_run_after_the_owner_vanished_declares_it_lost(short_lease: RedisStore) -> None:
    """The next run's open ends the dead one with agent_lost at the next seq, then takes the session."""
    store = short_lease
    old = await start(store)
    await store.append(old, TOKEN, token(old, "a"))
    await store.append(old, TOOL_CALL, call("c1"))
    with pytest.raises(SessionBusy):
        await store.open_run("s1", "r2")
    await asyncio.sleep(0.5)
    new = await store.open_run("s1", "r2")
    assert new.seq == 2
    lost = (await store.read("s1", (1, 0), 0))[-1]
    assert (lost.pos, lost.kind) == ((2, 0), ERROR)
    data = json.loads(lost.data)
    assert lost.data == dumps(data)
    assert list(data) == ["run_id", "code", "message", "retryable", "seq"]
    assert (data["run_id"], data["code"], data["retryable"], data["seq"]) == ("r1", ERR_AGENT_LOST, True, 2)
    assert "stopped" in data["message"]
    assert await store.answer("r1", "c1", {"result": 1}) == "no run"
    attachment = await store.attach("s1", 2, "a2")
    assert (attachment.run_id, attachment.pending) == ("r2", [])


async def test_declare_lost_ends_a_run_whose_lease_is_gone(short_lease: RedisStore) -> None:
    """What a reader does once a second: owner_alive false -> declare_lost -> agent_lost in the log, once."""
    store = short_lease
    old = await start(store)
    await store.append(old, TOOL_CALL, call("c1"))
    await asyncio.sleep(0.5)
    assert await store.owner_alive("s1", "r1") is False
    await store.declare_lost("s1", "r1")
    await store.declare_lost("s1", "r1")
    entries = await store.read("s1", (0, 1), 0)
    assert [(e.pos, e.kind) for e in entries] == [((0, 2), TOOL_CALL), ((1, 0), ERROR)]
    assert json.loads(entries[-1].data)["code"] == ERR_AGENT_LOST
    attachment = await store.attach("s1", 1, "a2")
    assert (attachment.run_id, attachment.pending) == (None, [])
    assert await store.redis.exists(store.keys("s1")[PENDING]) == 0  # its pending calls went with it
    assert (await store.open_run("s1", "r2")).seq == 1


async def test_a_resent_notification_fails_instead_of_doubling(redis_server: RedisServer) -> None:
    """The same append sent twice (the holder's seq not moved on) is refused by the explicit id "N-0"."""
    store = RedisStore(redis_server.url, prefix=new_prefix())
    try:
        lease = await start(store)
        resent = dataclasses.replace(lease)
        await store.append(lease, TOKEN, token(lease, "once"))
        with pytest.raises(StoreUnavailable):
            await store.append(resent, TOKEN, token(resent, "once"))
        assert [e.pos for e in await store.read("s1", (0, 1), 0)] == [(1, 0)]
    finally:
        await store.close()


def client_commands(url: str, started: threading.Event, commands: list[str]) -> None:
    """MONITOR Redis until it sees ECHO "end": the name of each command a client sent (not a script's own calls)."""
    with redis_sync.Redis.from_url(url, decode_responses=True) as admin, admin.monitor() as monitor:
        started.set()
        for command in monitor.listen():
            if command["command"] == "ECHO end":
                return
            if command["client_type"] != "lua":
                commands.append(command["command"].split(" ")[0].upper())


async def test_a_token_append_is_one_round_trip_and_a_read_one_xread(redis_server: RedisServer) -> None:
    """The hot path: append is one EVALSHA, read one XREAD, as Redis's MONITOR sees them arrive."""
    store = RedisStore(redis_server.url, prefix=new_prefix())
    try:
        lease = await start(store)
        after = (await store.read("s1", (0, 0), 0))[-1].pos
        started, commands = threading.Event(), []
        monitoring = asyncio.create_task(asyncio.to_thread(client_commands, redis_server.url, started, commands))
        await asyncio.to_thread(started.wait, 5)
        for n in range(20):
            await store.append(lease, TOKEN, token(lease, str(n)))
            after = (await store.read("s1", after, 1))[-1].pos
        await store.redis.echo("end")
        await monitoring
        assert commands == ["EVALSHA", "XREAD"] * 20
    finally:
        await store.close()


async def test_a_vanished_reader_expires(redis_server: RedisServer) -> None:
    """A stream on a replica that died never detaches: it counts as gone once it stops checking in."""
    store = RedisStore(redis_server.url, prefix=new_prefix(), reader_ttl_s=0.3)
    try:
        await store.open_run("s1", "r1")
        await store.attach("s1", 0, "a1")
        for _ in range(4):
            await asyncio.sleep(0.15)
            await store.keep_attached("s1", "a1")
            assert await store.unattached_for("s1") == 0
        await asyncio.sleep(0.5)
        assert 0.1 <= await store.unattached_for("s1") < 1
    finally:
        await store.close()


async def test_redis_stalling_loses_and_doubles_nothing(redis_server: RedisServer) -> None:
    """DEBUG SLEEP 2 from another client in the middle of a stream of appends: every seq once, in order."""
    store = RedisStore(redis_server.url, prefix=new_prefix())
    admin = redis_sync.Redis.from_url(redis_server.url)
    try:
        lease = await start(store)
        stall = None
        began = time.monotonic()
        for n in range(1, 201):
            if n == 50:
                stall = asyncio.create_task(asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "2"))
                await asyncio.sleep(0.1)  # let the stall begin
            await store.append(lease, TOKEN, token(lease, str(n)))
        await stall
        assert time.monotonic() - began >= 1.8
        entries = await store.read("s1", (0, 1), 0)
        assert [(e.pos, json.loads(e.data)["text"]) for e in entries] == [((n, 0), str(n)) for n in range(1, 201)]
    finally:
        admin.close()
        await store.close()


async def test_many_blocked_reads_at_once(redis_server: RedisServer) -> None:
    """150 runs, each with its inbox and a stream waiting in XREAD BLOCK: every wait gets its own connection and wakes."""
    store = RedisStore(redis_server.url, prefix=new_prefix())
    try:
        leases = [await start(store, f"s{n}", f"r{n}") for n in range(150)]
        inboxes = [asyncio.create_task(store.inbox(lease, 5)) for lease in leases]
        reads = [asyncio.create_task(store.read(lease.session_id, (0, 1), 5)) for lease in leases]
        await asyncio.sleep(0.2)
        for lease in leases:
            await store.append(lease, TOKEN, token(lease, "wake"))
            await store.cancel(lease.run_id)
        assert [await inbox for inbox in inboxes] == [[{"cancel": True}]] * 150
        assert [[e.pos for e in await read] for read in reads] == [[(1, 0)]] * 150
    finally:
        await store.close()


async def test_a_timed_out_command_is_reported_not_sent_again(redis_server: RedisServer) -> None:
    """An append that times out in a stall raises StoreUnavailable at once: it may have run, so it is not resent.

    (Here Redis drops it with the closed connection; a resend could have doubled a tool_call,
    whose id Redis numbers, had the first one run and only its reply been lost.)"""
    store = RedisStore(redis_server.url, prefix=new_prefix(), socket_timeout_s=0.5)
    admin = redis_sync.Redis.from_url(redis_server.url)
    try:
        lease = await start(store)
        stall = asyncio.create_task(asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.append(lease, TOOL_CALL, call("c1"))
        assert time.monotonic() - began < 1
        await stall
        await asyncio.sleep(0.3)  # anything resent would have run by now
        assert [e.kind for e in await store.read("s1", (0, 1), 0)].count(TOOL_CALL) <= 1
    finally:
        admin.close()
        await store.close()


async def test_a_wait_longer_than_the_socket_timeout_is_no_error(redis_server: RedisServer) -> None:
    """inbox and read block for at most half the socket timeout: a longer wait returns early, empty, not StoreUnavailable."""
    store = RedisStore(redis_server.url, prefix=new_prefix(), socket_timeout_s=0.5)
    try:
        lease = await start(store)
        after = (await store.read("s1", (0, 0), 0))[-1].pos
        assert await store.inbox(lease, 2) == []
        assert await store.read("s1", after, 2) == []
    finally:
        await store.close()


async def test_every_key_is_prefixed_and_expires(redis_server: RedisServer) -> None:
    """After a whole session (runs, calls, answers, cancels, history, readers, a lost run), every key has a TTL."""
    prefix = new_prefix()
    store = RedisStore(redis_server.url, prefix=prefix, lease_s=0.3)
    admin = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        lease = await start(store)
        await store.append_history(lease, [{"role": "user", "content": "hi"}])
        await store.append(lease, TOKEN, token(lease, "a"))
        for call_id in ("c1", "c2", "c3"):
            await store.append(lease, TOOL_CALL, call(call_id))
        await store.answer("r1", "c1", {"result": 1})
        await store.expire_call(lease, "c2")
        await store.cancel("r1")
        await store.inbox(lease, 0.05)
        await store.cancel("r1")  # left unread
        await store.renew(lease)
        await store.keep_attached("s1", "att_r1")
        await store.attach("s1", 0, "a2")  # never detached
        await finish(store, lease)
        second = await start(store, run_id="r2")
        await store.append(second, TOOL_CALL, call("c4"))  # left waiting, and the owner vanishes
        await asyncio.sleep(0.5)
        await store.declare_lost("s1", "r2")
        await start(store, "s2", "r3")  # a second session, its run still going
        await store.detach("s1", "att_r1")
        keys = sorted(admin.scan_iter(match="*"))  # this test's keys, and those the tests before it left
        assert keys and all(key.startswith("test") for key in keys)  # every test's store has a "test...:" prefix
        assert [key for key in keys if admin.pttl(key) == -1] == []  # -1: no expiry (-2: gone since the scan)
        names = {key.removeprefix(prefix) for key in keys if key.startswith(prefix)}
        assert {"session:s1", "session:s1:log", "session:s1:history", "session:s1:readers", "run:r1", "run:r1:inbox",
                "session:s2", "session:s2:lease", "run:r3"} <= names
    finally:
        admin.close()
        await store.close()


async def test_the_first_call_after_a_quick_restart_works(tmp_path: Path) -> None:
    """Redis restarted between two calls: the pooled connections to the old server are not used."""
    server = start_redis(tmp_path)
    store = RedisStore(server.url, prefix=new_prefix())
    try:
        await asyncio.gather(*(store.load_history("s1") for _ in range(4)))  # several pooled connections
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        await asyncio.sleep(0.05)
        for n in range(4):
            assert (await store.open_run(f"s{n}", f"r{n}")).seq == 0
    finally:
        await store.close()
        server.stop()


async def test_redis_down_then_back(tmp_path: Path) -> None:
    """Every call raises StoreUnavailable while redis-server is stopped; the same store works once it is back."""
    server = start_redis(tmp_path)
    store = RedisStore(server.url, prefix=new_prefix())
    try:
        lease = await start(store)
        await asyncio.gather(*(store.load_history("s1") for _ in range(4)))  # several pooled connections
        reading = asyncio.create_task(store.read("s1", (0, 1), 3))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreUnavailable):
            await reading
        assert await store.healthy() is False
        calls = [store.open_run("s2", "r2"), store.renew(lease), store.append(lease, TOKEN, token(lease, "x")),
                 store.inbox(lease, 0.1), store.expire_call(lease, "c1"), store.load_history("s1"),
                 store.append_history(lease, [{"role": "user"}]), store.answer("r1", "c1", {"result": 1}),
                 store.cancel("r1"), store.attach("s1", 0, "a"), store.read("s1", (0, 0), 0.1),
                 store.keep_attached("s1", "a"), store.detach("s1", "a"), store.unattached_for("s1"),
                 store.owner_alive("s1", "r1"), store.declare_lost("s1", "r1")]
        for pending_call in calls:
            with pytest.raises(StoreUnavailable):
                await pending_call
        await asyncio.to_thread(server.start)  # empty: nothing was persisted
        await asyncio.sleep(0.05)
        # the first calls after the restart already work: no pooled connection is left dead
        again = await store.open_run("s2", "r2")
        await store.attach("s2", 0, "a2")
        await store.append(again, TOKEN, token(again, "back"))
        assert await store.healthy() is True
        assert [e.kind for e in await store.read("s2", (0, 0), 0)] == [ATTACH, TOKEN]
        with pytest.raises(LeaseLost):  # the old run's lease went with the old server's memory
            await store.append(lease, TOKEN, token(lease, "x"))
    finally:
        await store.close()
        server.stop()
