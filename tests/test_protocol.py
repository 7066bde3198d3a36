"""Tests for protocol.py: the bytes and frames every service puts on a wire.

Wire formats are checked against literal bytes. The SSE parser tests feed literal byte chunks and
are named after the WHATWG examples they come from:
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import asyncio
import gc
import random
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from protocol import (
    DONE,
    DONE_DATA,
    HEARTBEAT,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_ACTIVE_RUN,
    OPENAI_TO_METHOD,
    PARSE_ERROR,
    RUN_IN_PROGRESS,
    TOOL_ERRORS,
    TOOL_METHODS,
    TOOLS_SPEC,
    EventStreamResponse,
    Message,
    RpcError,
    SSEEvent,
    SSEParser,
    encode_data,
    dumps,
    encode_event,
    error_response,
    iter_sse,
    json_event,
    read_chunks,
    notification,
    openai_tool_name,
    openai_tools,
    parse_message,
    request,
    result,
    token_file,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> list[SSEEvent]:
    """Feed each chunk to one fresh parser, as successive network reads; return every event."""
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


async def chunks_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    """Run `app` under a real uvicorn on a free port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "uvicorn exited before it started"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)
        sock.close()


# ---------------------------------------------------------------------------------------------
# 1. SSE encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "event", "id", "expected"),
    [
        ("x", None, None, b"data: x\n\n"),
        ("", None, None, b"data: \n\n"),
        ("a\nb", None, None, b"data: a\ndata: b\n\n"),
        ("a\n\nb", None, None, b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", None, None, b"data: a\ndata: \n\n"),
        ("x", "token", None, b"event: token\ndata: x\n\n"),
        ("x", None, 7, b"id: 7\ndata: x\n\n"),
        ("x", None, 0, b"id: 0\ndata: x\n\n"),
        ("x", None, "r1-7", b"id: r1-7\ndata: x\n\n"),
        ('{"text":"hi"}', "token", 3, b'event: token\nid: 3\ndata: {"text":"hi"}\n\n'),
        ("1\n2", "final", 9, b"event: final\nid: 9\ndata: 1\ndata: 2\n\n"),
        ("h\u00e9llo \u2713", "token", 1, b"event: token\nid: 1\ndata: h\xc3\xa9llo \xe2\x9c\x93\n\n"),
    ],
    ids=[
        "data",
        "empty-data",
        "multi-line",
        "blank-middle-line",
        "trailing-newline",
        "event",
        "int-id",
        "zero-id",
        "str-id",
        "event-id-data-order",
        "event-id-multi-line",
        "unicode",
    ],
)
def test_encode_event(data: str, event: str | None, id: str | int | None, expected: bytes) -> None:
    """encode_event writes event, id, data in that order, one data line per text line."""
    assert encode_event(data, event=event, id=id) == expected


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"run_id": "r1", "text": "hi"}, b'event: token\nid: 3\ndata: {"run_id":"r1","text":"hi"}\n\n'),
        ({"text": "a\nb\r\u2028\u00e9"}, b'event: token\nid: 3\ndata: {"text":"a\\nb\\r\xe2\x80\xa8\xc3\xa9"}\n\n'),
        ({"text": "\ud800"}, b'event: token\nid: 3\ndata: {"text":"\\ud800"}\n\n'),
    ],
    ids=["plain", "line-ends-escaped-unicode-raw", "lone-surrogate-escaped"],
)
def test_json_event(obj: dict[str, Any], expected: bytes) -> None:
    """json_event writes the bytes encode_event(dumps(obj)) writes, for any object."""
    assert json_event("token", obj, 3) == expected == encode_event(dumps(obj), "token", 3)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"a":1}', b'data: {"a":1}\n\n'),
        ("", b"data: \n\n"),
        ("\u00e9", b"data: \xc3\xa9\n\n"),
        (DONE_DATA, b"data: [DONE]\n\n"),
    ],
    ids=["json", "empty", "unicode", "done"],
)
def test_encode_data(data: str, expected: bytes) -> None:
    """encode_data writes a bare `data:` event."""
    assert encode_data(data) == expected


def test_heartbeat_bytes() -> None:
    """HEARTBEAT is one SSE comment line and a blank line."""
    assert HEARTBEAT == b": keep-alive\n\n"


def test_done_bytes() -> None:
    """DONE is OpenAI's end-of-stream sentinel event."""
    assert DONE == b"data: [DONE]\n\n"
    assert DONE == encode_data(DONE_DATA)


def test_heartbeat_dispatches_nothing() -> None:
    """A heartbeat is a comment: the parser yields no event for it."""
    assert feed_all([HEARTBEAT, HEARTBEAT]) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("x", "x"),
        ("a\nb", "a\nb"),
        ("a\n\nb", "a\n\nb"),
        ("a\n", "a\n"),
        (" lead", " lead"),
        ("h\u00e9llo \u2713", "h\u00e9llo \u2713"),
        ("a\r\nb", "a\nb"),
        ("a\rb", "a\nb"),
    ],
    ids=["empty", "one-line", "lf", "blank-line", "trailing-lf", "leading-space", "unicode", "crlf", "bare-cr"],
)
def test_encoded_text_round_trips_through_parser(text: str, expected: str) -> None:
    """Any text encode_event writes comes back whole from SSEParser (line ends as LF)."""
    assert feed_all([encode_event(text, event="token", id=1)]) == [SSEEvent("token", expected, "1")]


# ---------------------------------------------------------------------------------------------
# 2. SSE parser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["lf", "cr", "crlf"])
def test_line_ends(eol: bytes) -> None:
    """LF, CR and CRLF each end a line."""
    stream = b"event: token" + eol + b"id: 1" + eol + b"data: a" + eol + b"data: b" + eol + eol
    assert feed_all([stream]) == [SSEEvent("token", "a\nb", "1")]


def test_crlf_split_across_reads() -> None:
    """A CR ending one read and the LF opening the next are one line end, not a blank line."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\n") == [SSEEvent("message", "a")]


def test_crlf_split_across_reads_inside_event() -> None:
    """CR | LF between two data lines of one event does not dispatch the first line early."""
    assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent("message", "a\nb")]


def test_cr_then_lf_alone_in_next_read() -> None:
    """A read holding only the LF of a split CRLF yields nothing and changes nothing."""
    assert feed_all([b"data: a\r", b"\n", b"data: b\r", b"\n", b"\r", b"\n"]) == [SSEEvent("message", "a\nb")]


def test_empty_read_between_cr_and_lf() -> None:
    """An empty read between the CR and LF of a CRLF does not turn the LF into a blank line."""
    assert feed_all([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [SSEEvent("message", "a\nb")]


def test_cr_cr_lf_is_line_end_then_blank_line() -> None:
    """CR then CRLF is two line ends: the second is a blank line that dispatches."""
    assert feed_all([b"data: a\r", b"\r\n"]) == [SSEEvent("message", "a")]


def test_multi_line_data_joined_with_lf() -> None:
    """Several data lines make one event, joined with LF."""
    assert feed_all([b"data: one\ndata: two\ndata: three\n\n"]) == [SSEEvent("message", "one\ntwo\nthree")]


def test_comment_lines_ignored() -> None:
    """Lines starting with a colon are comments, even inside an event."""
    stream = b": hello\ndata: a\n:no space\n: keep-alive\ndata: b\n\n"
    assert feed_all([stream]) == [SSEEvent("message", "a\nb")]


def test_feed_returns_only_completed_events() -> None:
    """feed returns the events its read completed; a partial one waits for the next read."""
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b") == [SSEEvent("message", "a")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [SSEEvent("message", "b")]


# A stream exercising most rules at once: BOM, comment, CRLF, CR, LF, multi-byte UTF-8, ids.
MIXED_STREAM = (
    b"\xef\xbb\xbf: hello\r\n"
    b"event: token\r\nid: 1\r\ndata: h\xc3\xa9\r\ndata: \xe2\x9c\x93\r\n\r\n"
    b"data: b\rdata: c\r\r"
    b"retry: 5\nid: 2\nevent: final\ndata: d\n\n"
)
MIXED_EVENTS = [
    SSEEvent("token", "h\u00e9\n\u2713", "1"),
    SSEEvent("message", "b\nc", "1"),
    SSEEvent("final", "d", "2"),
]


def test_mixed_stream_in_one_read() -> None:
    """The mixed stream read at once gives its three events."""
    assert feed_all([MIXED_STREAM]) == MIXED_EVENTS


def test_every_split_point_gives_same_events() -> None:
    """Cutting the stream into two reads at any byte gives the same events."""
    for i in range(len(MIXED_STREAM) + 1):
        chunks = [MIXED_STREAM[:i], MIXED_STREAM[i:]]
        assert feed_all(chunks) == MIXED_EVENTS, f"split at byte {i}: {chunks!r}"


def test_one_byte_per_read_gives_same_events() -> None:
    """Feeding the stream one byte per read gives the same events."""
    assert feed_all([bytes([b]) for b in MIXED_STREAM]) == MIXED_EVENTS


def reference_events(stream: bytes) -> list[SSEEvent]:
    """The WHATWG algorithm written the plainest way, on the whole stream at once: the oracle."""
    text = stream.decode("utf-8", errors="replace").removeprefix("\ufeff")
    events, data, event, last_id = [], [], "", None
    for line in re.split("\r\n|\r|\n", text)[:-1]:  # the last piece has no line end: not a line
        if not line:
            if data:
                events.append(SSEEvent(event or "message", "\n".join(data), last_id))
            data, event = [], ""
            continue
        name, colon, value = line.partition(":")
        value = value[1:] if colon and value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


SSE_PIECES = [b"data: x", b"data:y", b"data: {\"a\":1}", b"data: \xc3\xa9\xe2\x82\xac", b"data: [DONE]", b"data",
              b"event: e", b"id: 7", b": keep-alive", b"retry: 5", b"other: z", b"data:  two spaces"]  # fmt: skip
SSE_ENDS = [b"\n", b"\n", b"\n\n", b"\n\n", b"\n\n", b"\r\n", b"\r", b"\r\n\r\n", b"\n\n\n"]


@pytest.mark.parametrize("seed", range(200))
def test_random_streams_and_cuts_match_the_spec(seed: int) -> None:
    """Random streams (mostly the common `data: X\\n\\n`, some CR, comments, fields, multi-byte
    text, BOMs), cut into random reads, give exactly the reference algorithm's events: the
    one-split-per-read path and the line-by-line path must agree wherever a stream moves between them."""
    rng = random.Random(seed)
    stream = b"\xef\xbb\xbf" if rng.random() < 0.1 else b""
    for _ in range(rng.randint(1, 30)):
        stream += rng.choice(SSE_PIECES) + rng.choice(SSE_ENDS)
    cuts = sorted(rng.sample(range(len(stream) + 1), min(len(stream) + 1, rng.randint(0, 8))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_all(chunks) == reference_events(stream), f"stream {stream!r} cut as {chunks!r}"


@pytest.mark.parametrize("piece", [b": keep-alive\n", b"data: x\n"], ids=["comments", "data-lines"])
def test_event_spread_over_many_reads_is_parsed_once(piece: bytes) -> None:
    """40,000 reads of one event's lines: each line is parsed once, not the whole event again per
    read (that was quadratic: minutes). The bound is a hang bound, not a speed test."""
    parser, started = SSEParser(), time.monotonic()
    events = [event for _ in range(40_000) for event in parser.feed(piece)] + parser.feed(b"data: end\n\n")
    assert time.monotonic() - started < 5
    expected = "end" if piece.startswith(b":") else "\n".join(["x"] * 40_000 + ["end"])
    assert events == [SSEEvent("message", expected)]


def test_leading_bom_dropped() -> None:
    """A UTF-8 BOM opening the stream is dropped."""
    assert feed_all([b"\xef\xbb\xbfdata: a\n\n"]) == [SSEEvent("message", "a")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_leading_bom_split_across_reads_dropped(cut: int) -> None:
    """A leading BOM cut across reads is still dropped."""
    stream = b"\xef\xbb\xbfdata: a\n\n"
    assert feed_all([stream[:cut], stream[cut:]]) == [SSEEvent("message", "a")]


def test_leading_bom_one_byte_per_read_dropped() -> None:
    """A leading BOM fed one byte per read is dropped."""
    assert feed_all([b"\xef", b"\xbb", b"\xbf", b"data: a\n\n"]) == [SSEEvent("message", "a")]


def test_bom_after_first_event_kept() -> None:
    """A BOM later in the stream is part of the line: here it spoils the field name."""
    assert feed_all([b"data: a\n\n\xef\xbb\xbfdata: b\n\n"]) == [SSEEvent("message", "a")]


def test_bom_in_data_value_kept() -> None:
    """A BOM inside a data value is data."""
    assert feed_all([b"data: \xef\xbb\xbfx\n\n"]) == [SSEEvent("message", "\ufeffx")]


def test_only_one_leading_bom_dropped() -> None:
    """Two BOMs at the start: the second is kept and spoils the first field name."""
    assert feed_all([b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n"]) == [SSEEvent("message", "b")]


def test_bom_prefix_then_other_bytes_not_dropped() -> None:
    """A first read that looks like the start of a BOM but is not one is kept (as U+FFFD)."""
    assert feed_all([b"\xef", b"data: a\n\ndata: b\n\n"]) == [SSEEvent("message", "b")]


def test_field_without_colon_is_empty_value() -> None:
    """`data` alone on a line adds an empty data line."""
    assert feed_all([b"data\n\n"]) == [SSEEvent("message", "")]


def test_only_one_leading_space_stripped() -> None:
    """`data:  x` keeps the second space."""
    assert feed_all([b"data:  x\n\n"]) == [SSEEvent("message", " x")]


def test_no_space_after_colon() -> None:
    """`data:x` is the value `x`."""
    assert feed_all([b"data:x\n\n"]) == [SSEEvent("message", "x")]


def test_colon_in_value_kept() -> None:
    """Only the first colon separates name and value."""
    assert feed_all([b'data: {"a": "b:c"}\n\n']) == [SSEEvent("message", '{"a": "b:c"}')]


def test_event_type_defaults_to_message() -> None:
    """Without an event field, or with an empty one, the type is `message`."""
    assert feed_all([b"data: a\n\nevent:\ndata: b\n\n"]) == [SSEEvent("message", "a"), SSEEvent("message", "b")]


def test_event_type_does_not_carry_to_next_event() -> None:
    """The event type is reset after each dispatch."""
    assert feed_all([b"event: token\ndata: a\n\ndata: b\n\n"]) == [SSEEvent("token", "a"), SSEEvent("message", "b")]


def test_last_event_id_carried_to_later_events() -> None:
    """Per spec the last event ID persists until another id field changes it."""
    stream = b"id: 7\ndata: a\n\ndata: b\n\nid: 8\ndata: c\n\n"
    assert feed_all([stream]) == [SSEEvent("message", "a", "7"), SSEEvent("message", "b", "7"), SSEEvent("message", "c", "8")]


def test_no_id_field_gives_none() -> None:
    """Before any id field the event's id is None."""
    assert feed_all([b"data: a\n\n"])[0].id is None


def test_id_with_nul_ignored() -> None:
    """An id field whose value holds NUL is ignored; the previous id stays."""
    stream = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"
    assert feed_all([stream]) == [SSEEvent("message", "a", "1"), SSEEvent("message", "b", "1")]


def test_event_without_data_not_dispatched() -> None:
    """A block with no data field fires nothing, and its event type does not leak."""
    stream = b"event: token\nid: 5\n\ndata: x\n\n"
    assert feed_all([stream]) == [SSEEvent("message", "x", "5")]


def test_unknown_fields_and_retry_ignored() -> None:
    """retry and unknown field names change nothing."""
    stream = b"retry: 1000\nfoo: bar\nData: no\ndata: x\n\nretry: 5\n\n"
    assert feed_all([stream]) == [SSEEvent("message", "x")]


@pytest.mark.parametrize("cut", [7, 8, 9])
def test_multi_byte_utf8_split_across_reads(cut: int) -> None:
    """A character cut across reads decodes whole."""
    stream = b"data: \xe2\x9c\x93\n\n"  # U+2713 CHECK MARK, three bytes from index 6
    assert feed_all([stream[:cut], stream[cut:]]) == [SSEEvent("message", "\u2713")]


def test_invalid_utf8_replaced() -> None:
    """Bytes that are not UTF-8 decode to U+FFFD, as the spec's UTF-8 decode does."""
    assert feed_all([b"data: a\xffb\n\n"]) == [SSEEvent("message", "a\ufffdb")]


def test_unicode_line_separator_not_a_line_end() -> None:
    """U+2028 is data: only CR, LF and CRLF end lines."""
    stream = b'data: {"t":"a\xe2\x80\xa8b"}\n\n'
    assert feed_all([stream]) == [SSEEvent("message", '{"t":"a\u2028b"}')]


def test_incomplete_event_at_end_not_dispatched() -> None:
    """A block not closed by a blank line never fires."""
    assert feed_all([b"data: a\n\ndata: b\n"]) == [SSEEvent("message", "a")]


def test_whatwg_example_stock_ticker() -> None:
    """Spec example: three data lines make one message `YHOO\\n+2\\n10`."""
    chunks = [b"data: YHOO\n", b"data: +2\n", b"data: 10\n", b"\n"]
    assert feed_all(chunks) == [SSEEvent("message", "YHOO\n+2\n10")]


def test_whatwg_example_four_blocks() -> None:
    """Spec example: a comment, an id 1 event, an empty id that resets it, a leading-space value."""
    chunks = [
        b": test stream\n",
        b"\n",
        b"data: first event\n",
        b"id: 1\n",
        b"\n",
        b"data:second event\n",
        b"id\n",
        b"\n",
        b"data:  third event\n",
        b"\n",
    ]
    assert feed_all(chunks) == [
        SSEEvent("message", "first event", "1"),
        SSEEvent("message", "second event", ""),
        SSEEvent("message", " third event", ""),
    ]


def test_whatwg_example_two_events_last_block_discarded() -> None:
    """Spec example `data\\n\\ndata\\ndata\\n\\ndata:`: fires "" and "\\n"; the last block never fires."""
    chunks = [b"data\n", b"\n", b"data\n", b"data\n", b"\n", b"data:"]
    assert feed_all(chunks) == [SSEEvent("message", ""), SSEEvent("message", "\n")]


def test_whatwg_example_two_identical_events() -> None:
    """Spec example `data:test` and `data: test` fire two identical events."""
    chunks = [b"data:test\n", b"\n", b"data: test\n", b"\n"]
    assert feed_all(chunks) == [SSEEvent("message", "test"), SSEEvent("message", "test")]


def test_whatwg_example_event_types() -> None:
    """Spec example: `add`, `remove`, `add` events each carry their own type."""
    stream = b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    assert feed_all([stream]) == [
        SSEEvent("add", "73857293"),
        SSEEvent("remove", "2153"),
        SSEEvent("add", "113411"),
    ]


# ---------------------------------------------------------------------------------------------
# 3. iter_sse
# ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_iter_sse_yields_one_list_per_read() -> None:
    """iter_sse yields the events each read completed, skipping reads that completed none."""
    chunks = chunks_of(b"data: a\n\ndata: b\n\n", b": keep-alive\n\n", b"data: c", b"\n\n", b"data: d\n")
    lists = [events async for events in iter_sse(chunks)]
    assert lists == [
        [SSEEvent("message", "a"), SSEEvent("message", "b")],
        [SSEEvent("message", "c")],
    ]


def paced_body(schedule: list[float | bytes]) -> Starlette:
    """An app whose GET / streams `schedule`: bytes are written, numbers are pauses in seconds."""

    async def body() -> AsyncIterator[bytes]:
        for step in schedule:
            if isinstance(step, bytes):
                yield step
            else:
                await asyncio.sleep(step)

    async def endpoint(request: Request) -> StreamingResponse:
        return StreamingResponse(body())

    return Starlette(routes=[Route("/", endpoint)])


@pytest.mark.asyncio
async def test_read_chunks_times_out_on_silence() -> None:
    """A body that goes quiet mid-way: the reads so far, then TimeoutError after the idle time."""
    async with serve(paced_body([b"one", 5.0, b"never"])) as url, aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            got = []
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                async for data in read_chunks(response.content, 0.3):
                    got.append(data)
            waited = asyncio.get_running_loop().time() - started
    assert got == [b"one"]
    assert 0.3 <= waited < 2.0  # the timer wakes at most once per idle time: fires within 2x of it


@pytest.mark.asyncio
async def test_read_chunks_steady_trickle_never_times_out() -> None:
    """Data every 0.1 s for 1.2 s under a 0.3 s idle timeout: the one timer re-arms, never fires."""
    async with serve(paced_body([b"x", *[0.1, b"x"] * 12])) as url, aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            got = b"".join([data async for data in read_chunks(response.content, 0.3)])
    assert got == b"x" * 13


@pytest.mark.asyncio
async def test_read_chunks_caller_time_between_reads_does_not_count() -> None:
    """A caller busy for 3x the idle time between reads (its peer slow, say) is not timed out."""
    async with serve(paced_body([b"a", 0.05, b"b", 0.05, b"c"])) as url, aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            got = []
            async for data in read_chunks(response.content, 0.2):
                got.append(data)
                await asyncio.sleep(0.6)
    assert b"".join(got) == b"abc"


class Body:
    """An in-memory body with aiohttp's StreamReader semantics, as far as read_chunks uses them:
    readany returns what is buffered, else waits; set_exception fails the waiting read, or the next."""

    def __init__(self) -> None:
        self.total_bytes = 0
        self.buffered: list[bytes] = []
        self.ended = False
        self.exc: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def feed(self, data: bytes) -> None:
        self.buffered.append(data)
        self.total_bytes += len(data)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self.exc = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def readany(self) -> bytes:
        if self.exc is not None:
            raise self.exc
        if not self.buffered and not self.ended:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.buffered.pop(0) if self.buffered else b""


@pytest.mark.asyncio
async def test_read_chunks_busy_loop_does_not_fail_a_stream_that_talks() -> None:
    """Bytes that arrive in the same loop turn as an overdue timer (the loop was busy) are not silence."""
    body = Body()
    reads = read_chunks(body, 0.2)
    first = asyncio.ensure_future(anext(reads))
    await asyncio.sleep(0)  # the read is waiting; the timer is due in 0.2 s
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + 0.15, body.feed, b"one")
    time.sleep(0.3)  # block the loop: the data and the timer come due in one turn, the data first
    assert await first == b"one"
    body.feed(b"two")
    body.end()
    assert [data async for data in reads] == [b"two"]


class OneRead:
    """A body that gives one read, then waits forever: enough of aiohttp's StreamReader for read_chunks."""

    def __init__(self) -> None:
        self.reads = [b"a"]
        self.total_bytes = 1

    async def readany(self) -> bytes:
        if self.reads:
            return self.reads.pop()
        await asyncio.Event().wait()
        return b""

    def set_exception(self, exc: BaseException) -> None:
        raise AssertionError(f"the body was failed: {exc!r}")


@pytest.mark.asyncio
async def test_read_chunks_closed_early_leaves_no_timer() -> None:
    """Closed before the end, the generator takes its timer with it: nothing holds the body after."""
    content = OneRead()
    reads = read_chunks(content, 0.05)
    assert await anext(reads) == b"a"
    await reads.aclose()
    await asyncio.sleep(0.2)  # four idle times: an orphan timer would have fired and re-armed by now
    gone = weakref.ref(content)
    del content, reads
    gc.collect()
    assert gone() is None, "a timer still holds the body"


# ---------------------------------------------------------------------------------------------
# 4. JSON-RPC 2.0
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            '{"jsonrpc":"2.0","id":1,"method":"user_message","params":{"content":"hi"}}',
            Message("request", id=1, method="user_message", params={"content": "hi"}),
        ),
        (
            '{"jsonrpc":"2.0","id":"a1","method":"cancel","params":{"run_id":"r1"}}',
            Message("request", id="a1", method="cancel", params={"run_id": "r1"}),
        ),
        ('{"jsonrpc":"2.0","id":2,"method":"cancel"}', Message("request", id=2, method="cancel")),
        ('{"jsonrpc":"2.0","id":null,"method":"cancel"}', Message("request", id=None, method="cancel")),
        (
            '{"jsonrpc":"2.0","method":"cancel","params":{"run_id":"r1"}}',
            Message("notification", method="cancel", params={"run_id": "r1"}),
        ),
        (
            '{"jsonrpc":"2.0","id":"call_1","result":{"applied":true,"files":["a.py"]}}',
            Message("response", id="call_1", result={"applied": True, "files": ["a.py"]}),
        ),
        ('{"jsonrpc":"2.0","id":3,"result":null}', Message("response", id=3, result=None)),
        (
            '{"jsonrpc":"2.0","id":"call_2","error":{"code":-32011,"message":"not found: x.py"}}',
            Message("response", id="call_2", error={"code": -32011, "message": "not found: x.py"}),
        ),
        (
            '{"jsonrpc":"2.0","id":"call_3","error":{"code":-32021,"message":"hunk 2","data":{"file":"a.py"}}}',
            Message("response", id="call_3", error={"code": -32021, "message": "hunk 2", "data": {"file": "a.py"}}),
        ),
        (
            '{"type": "user_message", "content": "hi"}',
            Message("notification", method="user_message", params={"content": "hi"}),
        ),
        (b'{"jsonrpc":"2.0","method":"cancel"}', Message("notification", method="cancel")),
        (
            '{"jsonrpc":"2.0","id":4,"method":"user_message","params":{"content":"h\u00e9 \u2713"}}',
            Message("request", id=4, method="user_message", params={"content": "h\u00e9 \u2713"}),
        ),
    ],
    ids=[
        "request",
        "request-str-id",
        "request-no-params",
        "request-null-id",
        "notification",
        "result-response",
        "null-result-response",
        "error-response",
        "error-response-with-data",
        "seed-frame",
        "bytes-frame",
        "unicode-params",
    ],
)
def test_parse_message_valid(frame: str | bytes, expected: Message) -> None:
    """parse_message turns each valid frame into one checked Message."""
    assert parse_message(frame) == expected


@pytest.mark.parametrize(
    ("frame", "code", "id"),
    [
        ("not json", PARSE_ERROR, None),
        ("", PARSE_ERROR, None),
        ('{"jsonrpc":"2.0",', PARSE_ERROR, None),
        (b"\xff\xfe\xfa", PARSE_ERROR, None),
        ("[]", INVALID_REQUEST, None),
        ('[{"jsonrpc":"2.0","id":1,"method":"cancel"}]', INVALID_REQUEST, None),
        ("1", INVALID_REQUEST, None),
        ('"user_message"', INVALID_REQUEST, None),
        ("null", INVALID_REQUEST, None),
        ('{"id":5,"method":"cancel"}', INVALID_REQUEST, 5),
        ('{"jsonrpc":"1.0","id":"a","method":"cancel"}', INVALID_REQUEST, "a"),
        ('{"jsonrpc":2.0,"id":6,"method":"cancel"}', INVALID_REQUEST, 6),
        ('{"jsonrpc":"2.0","id":true,"method":"cancel"}', INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":1.5,"method":"cancel"}', INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":1.0,"method":"cancel"}', INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":[1],"method":"cancel"}', INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":{},"method":"cancel"}', INVALID_REQUEST, None),
        ('{"jsonrpc":"2.0","id":7,"method":"user_message","params":["hi"]}', INVALID_PARAMS, 7),
        ('{"jsonrpc":"2.0","id":8,"method":"user_message","params":"hi"}', INVALID_PARAMS, 8),
        ('{"jsonrpc":"2.0","id":9,"method":""}', INVALID_REQUEST, 9),
        ('{"jsonrpc":"2.0","id":10,"method":5}', INVALID_REQUEST, 10),
        ('{"jsonrpc":"2.0","id":11,"method":null}', INVALID_REQUEST, 11),
        ('{"jsonrpc":"2.0","id":12,"result":1,"error":{"code":1,"message":"x"}}', INVALID_REQUEST, 12),
        ('{"jsonrpc":"2.0","id":13}', INVALID_REQUEST, 13),
        ('{"jsonrpc":"2.0","id":14,"error":{"message":"x"}}', INVALID_REQUEST, 14),
        ('{"jsonrpc":"2.0","id":15,"error":{"code":"-32000","message":"x"}}', INVALID_REQUEST, 15),
        ('{"jsonrpc":"2.0","id":16,"error":{"code":1.5,"message":"x"}}', INVALID_REQUEST, 16),
        ('{"jsonrpc":"2.0","id":17,"error":{"code":-32000}}', INVALID_REQUEST, 17),
        ('{"jsonrpc":"2.0","id":18,"error":"oops"}', INVALID_REQUEST, 18),
        ('{"jsonrpc":"2.0","id":19,"error":{"code":true,"message":"x"}}', INVALID_REQUEST, 19),
    ],
    ids=[
        "not-json",
        "empty",
        "truncated-json",
        "not-utf8",
        "empty-array",
        "batch",
        "number",
        "string",
        "null",
        "missing-jsonrpc",
        "wrong-jsonrpc",
        "jsonrpc-number",
        "bool-id",
        "float-id",
        "integral-float-id",
        "array-id",
        "object-id",
        "params-array",
        "params-string",
        "method-empty",
        "method-number",
        "method-null",
        "result-and-error",
        "neither-result-nor-error",
        "error-without-code",
        "error-code-string",
        "error-code-float",
        "error-without-message",
        "error-not-object",
        "error-code-bool",
    ],
)
def test_parse_message_invalid(frame: str | bytes, code: int, id: int | str | None) -> None:
    """parse_message rejects each bad frame with its JSON-RPC code and, when readable, its id."""
    with pytest.raises(RpcError) as info:
        parse_message(frame)
    assert (info.value.code, info.value.id) == (code, id)


def test_wrong_version_error_names_expected_and_got() -> None:
    """The -32600 for a wrong version says what was expected and what arrived."""
    with pytest.raises(RpcError) as info:
        parse_message('{"jsonrpc":"1.0","id":1,"method":"cancel"}')
    assert '"2.0"' in info.value.message and "1.0" in info.value.message


def test_parse_error_response_bytes() -> None:
    """A parse error answers with id null and code -32700."""
    with pytest.raises(RpcError) as info:
        parse_message("not json")
    assert info.value.response().startswith('{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error: ')


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            RpcError(METHOD_NOT_FOUND, "Method not found: frobnicate", id=3),
            '{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"Method not found: frobnicate"}}',
        ),
        (
            RpcError(INVALID_REQUEST, "Invalid Request"),
            '{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid Request"}}',
        ),
        (
            RpcError(RUN_IN_PROGRESS, "run r1 is still going", id="a", data={"run_id": "r1"}),
            '{"jsonrpc":"2.0","id":"a","error":{"code":-32000,"message":"run r1 is still going","data":{"run_id":"r1"}}}',
        ),
    ],
    ids=["with-id", "null-id", "with-data"],
)
def test_rpc_error_response(error: RpcError, expected: str) -> None:
    """RpcError.response() is the exact error frame."""
    assert error.response() == expected


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            request(1, "read_file", {"path": "a.py"}),
            '{"jsonrpc":"2.0","id":1,"method":"read_file","params":{"path":"a.py"}}',
        ),
        (request("call_1", "git.diff", {}), '{"jsonrpc":"2.0","id":"call_1","method":"git.diff","params":{}}'),
        (
            notification("token", {"run_id": "r1", "seq": 1, "text": "h\u00e9 \u2713"}),
            '{"jsonrpc":"2.0","method":"token","params":{"run_id":"r1","seq":1,"text":"h\u00e9 \u2713"}}',
        ),
        (
            result(1, {"session_id": "s1", "run_id": "r1"}),
            '{"jsonrpc":"2.0","id":1,"result":{"session_id":"s1","run_id":"r1"}}',
        ),
        (result("x", None), '{"jsonrpc":"2.0","id":"x","result":null}'),
        (
            error_response(None, PARSE_ERROR, "Parse error"),
            '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}',
        ),
        (
            error_response(2, -32011, "not found", {"path": "x"}),
            '{"jsonrpc":"2.0","id":2,"error":{"code":-32011,"message":"not found","data":{"path":"x"}}}',
        ),
    ],
    ids=["request", "request-empty-params", "notification-unicode", "result", "null-result", "error", "error-with-data"],
)
def test_builders_exact_strings(frame: str, expected: str) -> None:
    """Builders write compact JSON, keys in the order jsonrpc, id, method/result/error, params."""
    assert frame == expected


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (request(1, "read_file", {"path": "a.py"}), Message("request", id=1, method="read_file", params={"path": "a.py"})),
        (notification("final", {"status": "completed"}), Message("notification", method="final", params={"status": "completed"})),
        (result("c1", {"ok": True}), Message("response", id="c1", result={"ok": True})),
        (error_response("c2", -32012, "outside"), Message("response", id="c2", error={"code": -32012, "message": "outside"})),
    ],
    ids=["request", "notification", "result", "error"],
)
def test_builders_parse_back(frame: str, expected: Message) -> None:
    """What the builders write, parse_message reads back unchanged."""
    assert parse_message(frame) == expected


# ---------------------------------------------------------------------------------------------
# 5. The tool table
# ---------------------------------------------------------------------------------------------

OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def test_openai_tool_name_replaces_dot() -> None:
    """git.diff goes to the model as git_diff."""
    assert openai_tool_name("git.diff") == "git_diff"
    assert openai_tool_name("read_file") == "read_file"


def test_tool_methods_are_the_contract_six() -> None:
    """tools_spec.json holds exactly the six tools of the contract."""
    assert set(TOOL_METHODS) == {"read_file", "write_file", "git.diff", "apply_patch", "apply_patch_review", "prompt_user"}
    assert len(TOOL_METHODS) == 6


def test_openai_to_method_round_trip() -> None:
    """Every tool's OpenAI name maps back to its IDE method, with no two names colliding."""
    assert len(OPENAI_TO_METHOD) == len(TOOL_METHODS)
    for method in TOOL_METHODS:
        assert OPENAI_TO_METHOD[openai_tool_name(method)] == method


def test_openai_tools_names_valid() -> None:
    """Every function name in openai_tools() matches OpenAI's name pattern."""
    tools = openai_tools()
    assert [t["function"]["name"] for t in tools] == [openai_tool_name(m) for m in TOOL_METHODS]
    for tool in tools:
        assert tool["type"] == "function"
        assert OPENAI_NAME.match(tool["function"]["name"]), tool["function"]["name"]
        assert tool["function"]["description"]


def test_openai_tools_parameters_are_object_schemas() -> None:
    """Every tool's parameters is an object schema whose required names are all properties."""
    for tool in openai_tools():
        params = tool["function"]["parameters"]
        name = tool["function"]["name"]
        assert params["type"] == "object", name
        assert isinstance(params["properties"], dict), name
        assert set(params.get("required", [])) <= set(params["properties"]), name


def test_tool_errors_named_in_error_codes() -> None:
    """Every error a tool lists is defined in TOOL_ERRORS."""
    for tool in TOOLS_SPEC["tools"]:
        assert set(tool["errors"]) <= set(TOOL_ERRORS), tool["method"]


def test_tool_error_codes_distinct_ints() -> None:
    """TOOL_ERRORS codes are ints (not bools) and no two are the same."""
    codes = list(TOOL_ERRORS.values())
    assert all(type(code) is int for code in codes)
    assert len(set(codes)) == len(codes)


def test_tool_error_codes_do_not_reuse_gateway_codes() -> None:
    """A tool error code never means one of the gateway's own errors (-32602 is shared on purpose)."""
    gateway_codes = {PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INTERNAL_ERROR, RUN_IN_PROGRESS, NO_ACTIVE_RUN}
    assert set(TOOL_ERRORS.values()).isdisjoint(gateway_codes)
    assert TOOL_ERRORS["invalid_arguments"] == INVALID_PARAMS


# ---------------------------------------------------------------------------------------------
# 6. EventStreamResponse
# ---------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_generator_closed_on_client_disconnect() -> None:
    """When the client goes away, the generator's finally runs at once, over a real socket."""
    closed = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield encode_event('{"text":"hi"}', event="token", id=1)
            await asyncio.Event().wait()  # a run that never ends on its own
        finally:
            closed.set()

    async def endpoint(request: Request) -> EventStreamResponse:
        return EventStreamResponse(events())

    app = Starlette(routes=[Route("/events", endpoint)])
    async with serve(app) as base_url:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/events") as response:
                async for batch in iter_sse(response.content.iter_any()):
                    assert batch == [SSEEvent("token", '{"text":"hi"}', "1")]
                    break
        await asyncio.wait_for(closed.wait(), 2)


@pytest.mark.asyncio
async def test_event_stream_headers() -> None:
    """The response is text/event-stream; charset=utf-8, not cached, not buffered by proxies."""

    async def events() -> AsyncIterator[bytes]:
        yield encode_data("x")

    async def endpoint(request: Request) -> EventStreamResponse:
        return EventStreamResponse(events(), headers={"X-Run-Id": "r1"})

    app = Starlette(routes=[Route("/events", endpoint)])
    async with serve(app) as base_url:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base_url}/events") as response:
                assert response.status == 200
                assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert response.headers["cache-control"] == "no-cache"
                assert response.headers["x-accel-buffering"] == "no"
                assert response.headers["x-run-id"] == "r1"
                assert await response.read() == b"data: x\n\n"


@pytest.mark.asyncio
async def test_generator_parked_at_yield_closed_on_disconnect() -> None:
    """A disconnect while the generator waits at a yield (send is blocked) still runs its finally."""
    closed = False
    first_body_sent = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        nonlocal closed
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"  # parked here: the send of this chunk never returns
            yield b"data: 3\n\n"
        finally:
            closed = True

    async def receive() -> dict[str, Any]:
        await first_body_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"] == b"data: 1\n\n":
            first_body_sent.set()
        elif message["type"] == "http.response.body":
            await asyncio.Event().wait()  # a client that stopped reading

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "GET", "path": "/", "headers": []}
    await asyncio.wait_for(EventStreamResponse(events())(scope, receive, send), 2)
    assert closed


# ---------------------------------------------------------------------------------------------
# 7. Where the gateway leaves its token
# ---------------------------------------------------------------------------------------------


def test_token_file_honours_gateway_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """GATEWAY_RUNTIME_DIR chooses the directory of gateway-PORT.json."""
    monkeypatch.setenv("GATEWAY_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert token_file(8000) == tmp_path / "gateway-8000.json"


def test_token_file_falls_back_to_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without GATEWAY_RUNTIME_DIR the file goes under $XDG_RUNTIME_DIR/refagent."""
    monkeypatch.delenv("GATEWAY_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert token_file(8123) == tmp_path / "refagent" / "gateway-8123.json"


@pytest.mark.parametrize(
    "params",
    [{"run_id": "run_1", "text": "hi", "seq": 7}, {"run_id": "r", "text": 'quote " and é\n', "seq": 7}],
    ids=["plain", "escapes"],
)
def test_notification_relayed_equals_notification(params: dict[str, Any]) -> None:
    """The agent's data placed whole as params gives the very bytes notification() would."""
    from protocol import dumps, notification_relayed

    assert notification_relayed("token", dumps(params)) == notification("token", params)


def test_notification_relayed_literal_frame() -> None:
    """The gateway's token frame, byte for byte."""
    from protocol import notification_relayed

    frame = notification_relayed("token", '{"run_id":"run_1","text":"Hi","seq":3}')
    assert frame == '{"jsonrpc":"2.0","method":"token","params":{"run_id":"run_1","text":"Hi","seq":3}}'


@pytest.mark.parametrize(
    ("event", "data", "seq", "wire"),
    [
        ("token", '{"text":"Hi","seq":3}', 3, b'event: token\nid: 3\ndata: {"text":"Hi","seq":3}\n\n'),
        ("tool_call", '{"id":"c1"}', None, b'event: tool_call\ndata: {"id":"c1"}\n\n'),
    ],
    ids=["notification-has-id", "tool-call-has-none"],
)
def test_log_event_bytes(event: str, data: str, seq: int | None, wire: bytes) -> None:
    """A log entry on the wire: `id:` is the session's seq, and a tool_call carries none (CONTRACT v2)."""
    from protocol import log_event

    assert log_event(event, data, seq) == wire
