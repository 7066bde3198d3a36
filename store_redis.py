"""store_redis.py: agent.Store on Redis, so that any number of agent processes serve the same sessions.

    IDE ⇄ gateway → agent(s) → llm_proxy → LLM
                       ⇅
                     Redis: session logs, history, run ownership, tool answers and cancels

Used by agent.py when REDIS_URL is set: `RedisStore(REDIS_URL)`. MemoryStore in agent.py is
the reference: this file does the same thing, with each step that must be atomic done by one
Lua script (each one below, with a comment). Needs Redis 7.0 or newer (XADD "<ms>-*").

Keys (P = REDIS_PREFIX; <sid> a session id, <rid> a run id; ids are [A-Za-z0-9_-]):

    P session:<sid>           hash    seq (newest notification's), run_id (the run in progress;
                                      absent when none), run_start (the log id the newest run's
                                      events come after), unattached_ms (when the last stream left),
                                      holder (the newest attach id: the socket the session belongs to)
    P session:<sid>:log       stream  the event log. Entry ids ARE positions: a notification
                                      with seq N is "N-0"; a tool_call or an attach marker after
                                      it is "N-1", "N-2", ... Fields: kind, data (compact JSON).
    P session:<sid>:lease     string  the run's lease token; PX AGENT_LEASE_S, renewed by its owner
    P session:<sid>:history   list    the conversation: one JSON chat message per item
    P session:<sid>:readers   zset    attach id -> when that stream counts as gone (ms, Redis TIME)
    P session:<sid>:pending   hash    call id -> log id of its tool_call, while the run waits
    P session:<sid>:closed    hash    call id -> "answered" | "timed out" (the run in progress)
    P run:<rid>               string  the run's session id, so a tool result or cancel finds it
    P run:<rid>:inbox         stream  messages for the run's owner; field message:
                                      {"call_id", "outcome"} or {"cancel": true}

Every key expires: the session's keys SESSION_TTL_S after the session's last write (each
script that writes refreshes them together), the run's keys SESSION_TTL_S after the run's last
write or lease renewal, the lease after AGENT_LEASE_S unless renewed.

Run ownership is a lease: open_run takes it with SET NX PX inside its script, renew
extends it only if its value is still ours (compare, then PEXPIRE), and every write by the
owner first checks that the lease holds the owner's token (fencing): an owner paused past its
lease (GC, SIGSTOP, a slow network) writes nothing more once it resumes. A stream attached to
a session notices a lease gone (owner_alive) and ends the run with agent_lost (declare_lost).

Replay and live tail are one XREAD loop over the log, from the stream's Last-Event-ID, so
nothing falls between them. Tool answers and cancels go through the run's inbox stream, read
by its owner with XREAD BLOCK: never pub/sub, which drops whatever nobody listens for.

Left out: Redis Cluster (answer and cancel look up the run's session, then touch its keys:
one Redis, or a primary with replicas, is assumed), and eviction: run Redis with
`maxmemory-policy noeviction` (the default), since a session's keys must vanish together.
Nothing is retried blindly: a command that timed out may have run, so it is reported
(StoreUnavailable) and the run ends, rather than sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from agent import (
    AGENT_LEASE_S,
    ATTACH,
    SESSION_TTL_S,
    Attachment,
    Entry,
    Lease,
    LeaseLost,
    Messages,
    Pos,
    RunIdTaken,
    SeqOutOfRange,
    SessionBusy,
    StoreUnavailable,
    Superseded,
    UnknownSession,
)
from protocol import ERR_AGENT_LOST, ERROR, FINAL, NOTIFICATIONS, TOOL_CALL, dumps

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "refagent:")  # every key starts with this
READER_TTL_S = 5.0  # a stream not heard from this long (its replica died) counts as gone; it checks in every second
MAX_BLOCK_S = 5.0  # longest XREAD BLOCK: a longer wait is several reads
SOCKET_TIMEOUT_S = 10.0  # above MAX_BLOCK_S plus a slow Redis (a 2 s stall loses and doubles nothing)
CONNECT_TIMEOUT_S = 2.0  # reaching Redis at all
HEALTH_TIMEOUT_S = 1.0  # /healthz's PING
READ_COUNT = 1000  # log entries per XREAD: a long replay is several reads
MAX_CONNECTIONS = 10_000  # per agent process; a blocked read holds one: about two per run in progress (its inbox, its stream)
LEASE_LOST = "LEASE_LOST"  # the error reply of a fenced write, as the scripts spell it
LOST_MESSAGE = "The agent process running this run stopped (its lease expired, AGENT_LEASE_S); send the message again."

# ---------------------------------------------------------------------------------------------
# Lua scripts. Each runs atomically. KEYS are the same for every script:
#   1 session, 2 log, 3 lease, 4 history, 5 readers, 6 pending, 7 closed, [8 run, 9 inbox]
# (8 and 9 only where a run is named). Event kinds and error codes come in ARGV, from protocol.py.
# ---------------------------------------------------------------------------------------------

SESSION, LOG, LEASE, HISTORY, READERS, PENDING, CLOSED, RUN, INBOX = range(9)  # the same, 0-based, in Python

# Shared by the scripts below (prepended to each).
HELPERS = """
local function touch_session(ttl)  -- the session's keys expire together, ttl after its last write
  for _, i in ipairs({1, 2, 4, 5, 6, 7}) do redis.call('EXPIRE', KEYS[i], ttl) end
end
local function touch_run(ttl)
  redis.call('EXPIRE', KEYS[8], ttl)
  redis.call('EXPIRE', KEYS[9], ttl)
end
local function now_ms()  -- Redis's clock, so that every agent replica reads the same time
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lose_run(run_id, kind, code, message)  -- end a run whose owner is gone, at the next seq
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local data = '{"run_id":"' .. run_id .. '","code":"' .. code .. '","message":' .. message
    .. ',"retryable":true,"seq":' .. seq .. '}'
  redis.call('XADD', KEYS[2], seq .. '-0', 'kind', kind, 'data', data)
  redis.call('HDEL', KEYS[1], 'run_id')
  redis.call('DEL', KEYS[6], KEYS[7])
end
"""

# open_run: a run holding a live lease -> {"busy", its run id}. A run marked in progress whose
# lease is gone (its owner died) is ended with agent_lost first. Then: take the lease, record
# the run, and drop the log up to the previous run's start (retention: that run and this one;
# a run's start is the last entry before its own events).
# A run id in use by another session -> {"taken"}; a socket whose attach id is no longer the
# session's holder -> {"superseded"} (a newer socket resumed the session).
# ARGV: 1 run id, 2 session id, 3 token, 4 lease ms, 5 ttl s, 6 error kind, 7 lost code, 8 lost message (JSON),
#       9 the asking socket's attach id, or ''
OPEN_RUN = """
local other = redis.call('GET', KEYS[8])
if other and other ~= ARGV[2] then return {'taken'} end
local holder = redis.call('HGET', KEYS[1], 'holder')
if ARGV[9] ~= '' and holder and holder ~= ARGV[9] then return {'superseded'} end
local running = redis.call('HGET', KEYS[1], 'run_id')
if running then
  if redis.call('EXISTS', KEYS[3]) == 1 then return {'busy', running} end
  lose_run(running, ARGV[6], ARGV[7], ARGV[8])
end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return {'busy', running or ''} end
local previous_start = redis.call('HGET', KEYS[1], 'run_start')
if previous_start then  -- drop what is not after it: MINID keeps ids >= its argument, so the id just after
  local s, n = string.match(previous_start, '(%d+)-(%d+)')
  redis.call('XTRIM', KEYS[2], 'MINID', s .. '-' .. (tonumber(n) + 1))
end
local seq = redis.call('HGET', KEYS[1], 'seq') or '0'
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
redis.call('HSET', KEYS[1], 'seq', seq, 'run_id', ARGV[1], 'run_start', last and last[1] or (seq .. '-0'))
redis.call('HSETNX', KEYS[1], 'unattached_ms', now_ms())
redis.call('DEL', KEYS[6], KEYS[7], KEYS[9])  -- a new run waits for no call yet
redis.call('SET', KEYS[8], ARGV[2], 'EX', ARGV[5])
touch_session(ARGV[5])
return {'ok', tonumber(seq)}
"""

# renew: extend our own lease. Compare, then PEXPIRE: never a plain SET, which would take the
# lease back from a run that has since taken the session over.
# ARGV: 1 token, 2 lease ms, 3 ttl s
RENEW = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
touch_session(ARGV[3])
touch_run(ARGV[3])
return 1
"""

# append: one event by the lease holder. A notification goes at "seq-0" with the seq the
# holder computed, so an XADD sent twice fails instead of doubling the event; a tool_call at
# "seq-*" (Redis numbers it), and waits in pending. A final or error frees the session.
# ARGV: 1 token, 2 kind, 3 data, 4 seq ('' if not a notification), 5 call id ('' if not a
# tool_call), 6 '1' if the event ends the run, 7 ttl s
APPEND = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
local id
if ARGV[4] ~= '' then
  id = redis.call('XADD', KEYS[2], ARGV[4] .. '-0', 'kind', ARGV[2], 'data', ARGV[3])
  redis.call('HSET', KEYS[1], 'seq', ARGV[4])
else
  id = redis.call('XADD', KEYS[2], redis.call('HGET', KEYS[1], 'seq') .. '-*', 'kind', ARGV[2], 'data', ARGV[3])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[6], ARGV[5], id) end
if ARGV[6] == '1' then
  redis.call('HDEL', KEYS[1], 'run_id')
  redis.call('DEL', KEYS[3], KEYS[6], KEYS[7])
end
touch_session(ARGV[7])
return id
"""

# expire_call: the holder stopped waiting for a call; a late answer gets "timed out".
# ARGV: 1 token, 2 call id, 3 ttl s
EXPIRE_CALL = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
if redis.call('HDEL', KEYS[6], ARGV[2]) == 1 then redis.call('HSET', KEYS[7], ARGV[2], 'timed out') end
touch_session(ARGV[3])
return 1
"""

# append_history: the holder's messages, at the end of the conversation.
# ARGV: 1 token, 2 ttl s, 3... one JSON message each
APPEND_HISTORY = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
redis.call('RPUSH', KEYS[4], unpack(ARGV, 3))
touch_session(ARGV[2])
return 1
"""

# answer: the first answer per call id wins. Run in progress? Call already answered or timed
# out? Call pending? Then close it and put the answer in the run's inbox, in one step.
# ARGV: 1 run id, 2 call id, 3 inbox message (JSON), 4 ttl s
ANSWER = """
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 'no run' end
local closed = redis.call('HGET', KEYS[7], ARGV[2])
if closed then return closed end
if redis.call('HDEL', KEYS[6], ARGV[2]) == 0 then return 'no call' end
redis.call('HSET', KEYS[7], ARGV[2], 'answered')
redis.call('XADD', KEYS[9], '*', 'message', ARGV[3])
touch_session(ARGV[4])
touch_run(ARGV[4])
return 'ok'
"""

# cancel: ask the run's owner, wherever it runs, to stop; only while the run is in progress.
# ARGV: 1 run id, 2 inbox message (JSON), 3 ttl s
CANCEL = """
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[9], '*', 'message', ARGV[2])
touch_run(ARGV[3])
return 1
"""

# attach: at one instant, check Last-Event-ID against what the log keeps, put our attach
# marker in the log, register the stream as a reader, and list the calls still waiting.
# The new attach id becomes the session's holder; a re-attach whose old id is no longer the
# holder gets {'superseded'}: a newer socket took the session meanwhile.
# Returns {'unknown'}, {'superseded'}, {'range', oldest seq, seq}, or {'ok', run id or '', seq, {log id, data, ...}}.
# ARGV: 1 last seq, 2 attach kind, 3 marker data, 4 attach id, 5 reader ttl ms, 6 ttl s, 7 previous attach id or ''
ATTACH_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'holder') ~= ARGV[7] then return {'superseded'} end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local oldest = seq + 1
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first then  -- "s-0" is seq s itself; "s-n" (n > 0) comes after s
  local s, n = string.match(first[1], '(%d+)-(%d+)')
  oldest = tonumber(s) + (n == '0' and 0 or 1)
end
local last_seq = tonumber(ARGV[1])
if last_seq < oldest - 1 or last_seq > seq then return {'range', oldest, seq} end
redis.call('XADD', KEYS[2], seq .. '-*', 'kind', ARGV[2], 'data', ARGV[3])
redis.call('HSET', KEYS[1], 'holder', ARGV[4])
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)  -- gone quiet; this stream's arrival outdates them
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[5]), ARGV[4])
local run = redis.call('HGET', KEYS[1], 'run_id') or ''
local pending = {}
if run ~= '' then
  for _, id in ipairs(redis.call('HVALS', KEYS[6])) do
    local entry = redis.call('XRANGE', KEYS[2], id, id)[1]  -- {id, {'kind', k, 'data', d}}
    if entry then
      table.insert(pending, id)
      table.insert(pending, entry[2][4])
    end
  end
end
touch_session(ARGV[6])
return {'ok', run, seq, pending}
"""

# keep_attached: a live stream checks in; it counts as attached until now + reader ttl.
# ARGV: 1 attach id, 2 reader ttl ms, 3 ttl s
KEEP_ATTACHED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[3])
return 1
"""

# detach: a stream went away; the session is unattached from now, unless another is attached.
# ARGV: 1 attach id
DETACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HSET', KEYS[1], 'unattached_ms', now_ms())
return 1
"""

# unattached_for: ms since the last stream left: 0 while one has not yet expired. A stream
# that vanished without detaching left when it expired.
UNATTACHED_FOR = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = now_ms()
local since = tonumber(redis.call('HGET', KEYS[1], 'unattached_ms') or now)
local latest = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')[2]  -- the reader that expires last
if latest then
  if tonumber(latest) > now then return 0 end
  since = math.max(since, tonumber(latest))
end
return math.max(0, now - since)
"""

# declare_lost: the run still marked in progress, and its lease gone: end it with agent_lost.
# ARGV: 1 run id, 2 error kind, 3 lost code, 4 lost message (JSON), 5 ttl s
DECLARE_LOST = """
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
lose_run(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
touch_session(ARGV[5])
return 1
"""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def log_id(pos: Pos) -> str:
    return f"{pos[0]}-{pos[1]}"


def parse_log_id(stream_id: str) -> Pos:
    seq, n = stream_id.split("-")
    return int(seq), int(n)


@contextlib.contextmanager
def redis_errors(lease: Lease | None = None) -> Iterator[None]:
    """Every Redis failure becomes StoreUnavailable; a fenced write's reply becomes LeaseLost."""
    try:
        yield
    except ResponseError as exc:
        if lease is not None and LEASE_LOST in str(exc):
            raise LeaseLost(lease.run_id) from None
        raise StoreUnavailable(f"Redis answered with an error: {exc}") from None
    except (RedisError, OSError) as exc:  # refused, reset, timed out, loading, read-only ...
        raise StoreUnavailable(f"Redis: {exc or type(exc).__name__}") from None


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class RedisStore:
    """agent.Store on one Redis: shared by every agent process that points at it."""

    def __init__(self, url: str, prefix: str = REDIS_PREFIX, lease_s: float = AGENT_LEASE_S, ttl_s: float = SESSION_TTL_S,
                 reader_ttl_s: float = READER_TTL_S, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        # retries=0: a command that failed after it was sent may have run; sending it again could double an event
        self.redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            max_connections=MAX_CONNECTIONS,  # redis-py's default, 100, would fail the 51st run
            retry=Retry(NoBackoff(), 0),
            # off: with it on, a pooled connection is not checked before use, so the first
            # command after a Redis restart would fail on the dead socket
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.ttl_s = max(1, math.ceil(ttl_s))
        self.reader_ttl_ms = int(reader_ttl_s * 1000)
        self.max_block_s = min(MAX_BLOCK_S, socket_timeout_s / 2)  # a blocked read must end before the socket times out
        script = self.redis.register_script  # EVALSHA, loading the script again after a Redis restart
        self.open_run_script = script(HELPERS + OPEN_RUN)
        self.renew_script = script(HELPERS + RENEW)
        self.append_script = script(HELPERS + APPEND)
        self.expire_call_script = script(HELPERS + EXPIRE_CALL)
        self.append_history_script = script(HELPERS + APPEND_HISTORY)
        self.answer_script = script(HELPERS + ANSWER)
        self.cancel_script = script(HELPERS + CANCEL)
        self.attach_script = script(HELPERS + ATTACH_SCRIPT)
        self.keep_attached_script = script(HELPERS + KEEP_ATTACHED)
        self.detach_script = script(HELPERS + DETACH)
        self.unattached_for_script = script(HELPERS + UNATTACHED_FOR)
        self.declare_lost_script = script(HELPERS + DECLARE_LOST)

    def keys(self, session_id: str, run_id: str = "") -> list[str]:
        """The scripts' KEYS, in their order (SESSION, LOG, ...): the session's seven, then the run's two if named."""
        s = f"{self.prefix}session:{session_id}"
        keys = [s, f"{s}:log", f"{s}:lease", f"{s}:history", f"{s}:readers", f"{s}:pending", f"{s}:closed"]
        if run_id:
            keys += [f"{self.prefix}run:{run_id}", f"{self.prefix}run:{run_id}:inbox"]
        return keys

    # the run's owner

    async def open_run(self, session_id: str, run_id: str, holder: str = "") -> Lease:
        token = secrets.token_hex(16)
        args = [run_id, session_id, token, self.lease_ms, self.ttl_s, ERROR, ERR_AGENT_LOST, dumps(LOST_MESSAGE), holder]
        with redis_errors():
            reply = await self.open_run_script(keys=self.keys(session_id, run_id), args=args)
        if reply[0] == "busy":
            raise SessionBusy(reply[1])
        if reply[0] == "taken":
            raise RunIdTaken(run_id)
        if reply[0] == "superseded":
            raise Superseded(session_id)
        return Lease(session_id, run_id, token, reply[1])

    async def renew(self, lease: Lease) -> None:
        with redis_errors(lease):
            await self.renew_script(keys=self.keys(lease.session_id, lease.run_id), args=[lease.token, self.lease_ms, self.ttl_s])

    async def append(self, lease: Lease, kind: str, data: dict[str, Any]) -> int:
        seq = lease.seq + 1 if kind in NOTIFICATIONS else None
        text = dumps({**data, "seq": seq} if seq is not None else data)
        call_id = data["id"] if kind == TOOL_CALL else ""
        ends = "1" if kind in (FINAL, ERROR) else ""
        args = [lease.token, kind, text, seq if seq is not None else "", call_id, ends, self.ttl_s]
        # Once sent, the script may run whatever happens to us: if the run is cancelled meanwhile,
        # wait for the answer anyway, so that lease.seq stays in step with the log (a seq left
        # behind would make the run's final collide with the event it failed to count).
        sent = asyncio.ensure_future(self.append_script(keys=self.keys(lease.session_id), args=args))
        with redis_errors(lease):
            try:
                await asyncio.shield(sent)
            except asyncio.CancelledError:
                await asyncio.wait([sent])
                if seq is not None and not sent.cancelled() and sent.exception() is None:
                    lease.seq = seq
                raise
        if seq is not None:
            lease.seq = seq
        return len(text)

    async def inbox(self, lease: Lease, timeout_s: float) -> list[dict[str, Any]]:
        # Only the run's owner reads its inbox, and it deletes what it has read: a message read
        # twice (the XDEL failed) is harmless, an answer resolves its call once.
        # Not fenced: it writes nothing the run's successor reads (the inbox is this run's alone),
        # and a lost lease is caught by the next write or renewal.
        key = self.keys(lease.session_id, lease.run_id)[INBOX]
        block = max(1, int(min(timeout_s, self.max_block_s) * 1000)) if timeout_s > 0 else None
        with redis_errors():
            reply = await self.redis.xread({key: "0-0"}, block=block)
            if not reply:
                return []
            entries = reply[0][1]  # [(id, {"message": json})]
            await self.redis.xdel(key, *[entry_id for entry_id, _ in entries])
        return [json.loads(fields["message"]) for _, fields in entries]

    async def expire_call(self, lease: Lease, call_id: str) -> None:
        with redis_errors(lease):
            await self.expire_call_script(keys=self.keys(lease.session_id), args=[lease.token, call_id, self.ttl_s])

    async def load_history(self, session_id: str) -> Messages:
        with redis_errors():
            items = await self.redis.lrange(self.keys(session_id)[HISTORY], 0, -1)
        return [json.loads(item) for item in items]

    async def append_history(self, lease: Lease, messages: Messages) -> None:
        if not messages:
            return
        args = [lease.token, self.ttl_s, *(dumps(message) for message in messages)]
        with redis_errors(lease):
            await self.append_history_script(keys=self.keys(lease.session_id), args=args)

    # anyone

    async def run_session(self, run_id: str) -> str | None:
        """The session of a run, from its run key (None once that expired)."""
        with redis_errors():
            return await self.redis.get(f"{self.prefix}run:{run_id}")

    async def answer(self, run_id: str, call_id: str, outcome: dict[str, Any]) -> str:
        session_id = await self.run_session(run_id)
        if session_id is None:
            return "no run"
        message = dumps({"call_id": call_id, "outcome": outcome})
        with redis_errors():
            return await self.answer_script(keys=self.keys(session_id, run_id), args=[run_id, call_id, message, self.ttl_s])

    async def cancel(self, run_id: str) -> bool:
        session_id = await self.run_session(run_id)
        if session_id is None:
            return False
        with redis_errors():
            found = await self.cancel_script(keys=self.keys(session_id, run_id), args=[run_id, dumps({"cancel": True}), self.ttl_s])
        return found == 1

    async def attach(self, session_id: str, last_seq: int, attach_id: str, previous: str = "") -> Attachment:
        args = [last_seq, ATTACH, dumps({"attach_id": attach_id}), attach_id, self.reader_ttl_ms, self.ttl_s, previous]
        with redis_errors():
            reply = await self.attach_script(keys=self.keys(session_id), args=args)
        if reply[0] == "unknown":
            raise UnknownSession(session_id)
        if reply[0] == "superseded":
            raise Superseded(session_id)
        if reply[0] == "range":
            oldest_seq, seq = reply[1], reply[2]
            raise SeqOutOfRange(last_seq < oldest_seq - 1, oldest_seq, seq)
        _, run_id, seq, flat = reply
        calls = sorted(zip(flat[0::2], flat[1::2]), key=lambda call: parse_log_id(call[0]))  # oldest first
        return Attachment(session_id, attach_id, (last_seq, 0), run_id or None, seq, [data for _, data in calls])

    async def read(self, session_id: str, after: Pos, timeout_s: float) -> list[Entry]:
        keys = self.keys(session_id)
        block = max(1, int(min(timeout_s, self.max_block_s) * 1000)) if timeout_s > 0 else None
        with redis_errors():
            reply = await self.redis.xread({keys[LOG]: log_id(after)}, count=READ_COUNT, block=block)
            if not reply and not await self.redis.exists(keys[SESSION]):  # only when idle: the hot path is one XREAD
                raise UnknownSession(session_id)
        if not reply:
            return []
        return [Entry(parse_log_id(entry_id), fields["kind"], fields["data"]) for entry_id, fields in reply[0][1]]

    async def keep_attached(self, session_id: str, attach_id: str) -> None:
        with redis_errors():
            await self.keep_attached_script(keys=self.keys(session_id), args=[attach_id, self.reader_ttl_ms, self.ttl_s])

    async def detach(self, session_id: str, attach_id: str) -> None:
        with redis_errors():
            await self.detach_script(keys=self.keys(session_id), args=[attach_id])

    async def unattached_for(self, session_id: str) -> float:
        with redis_errors():
            ms = await self.unattached_for_script(keys=self.keys(session_id))
        return ms / 1000

    async def owner_alive(self, session_id: str, run_id: str) -> bool:
        with redis_errors():
            return await self.redis.exists(self.keys(session_id)[LEASE]) == 1

    async def declare_lost(self, session_id: str, run_id: str) -> None:
        args = [run_id, ERROR, ERR_AGENT_LOST, dumps(LOST_MESSAGE), self.ttl_s]
        with redis_errors():
            await self.declare_lost_script(keys=self.keys(session_id, run_id), args=args)

    # housekeeping

    async def sweep(self) -> None:
        pass  # every key expires by itself

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
