"""Unit tests for agent.py's pure helpers (the loop itself is tested end to end, over sockets)."""

from __future__ import annotations

import pytest

from agent import RunEnded, parse_chunks
from protocol import ERR_LLM_STREAM


def test_parse_chunks_one_read() -> None:
    """Several chunks of one read come back as their objects, in order."""
    datas = ['{"choices":[{"delta":{"content":"a"}}]}', '{"choices":[]}', '{"usage":{"total_tokens":3}}']
    assert parse_chunks(datas) == [{"choices": [{"delta": {"content": "a"}}]}, {"choices": []}, {"usage": {"total_tokens": 3}}]


def test_parse_chunks_empty_read() -> None:
    assert parse_chunks([]) == []


@pytest.mark.parametrize(
    ("datas", "culprit"),
    [
        (['{"a":1}', "{this is not json}", '{"b":2}'], "{this is not json}"),
        (['{"a":1}', "[1]"], "[1]"),
        (['{"a":1}', ""], ""),
        (['{"a":1},{"b":2}', '{"c":1}'], '{"a":1},{"b":2}'),  # joined: 3 objects from 2 chunks
        (['{"a":1}', "1,2"], "1,2"),
        (['{"a":' + "[" * 100_000 + "]" * 100_000 + "}"], '{"a":' + "[" * 195),  # nested past the parser's limit
    ],
)
def test_parse_chunks_names_the_first_chunk_that_is_not_an_object(datas: list[str], culprit: str) -> None:
    """A read holding a bad chunk ends the run with llm_stream_broken, quoting that chunk."""
    with pytest.raises(RunEnded) as raised:
        parse_chunks(datas)
    assert raised.value.code == ERR_LLM_STREAM and raised.value.retryable
    assert raised.value.message == f"The LLM sent a chunk that is not a JSON object: {culprit!r}"


def test_parse_chunks_error_event_before_a_bad_chunk_wins() -> None:
    """An error event, then garbage in the same read: the error event is what the run reports."""
    error = '{"error":{"message":"overloaded","type":"server_error"}}'
    assert parse_chunks(['{"a":1}', error, "{not json"]) == [{"a": 1}, {"error": {"message": "overloaded", "type": "server_error"}}]
