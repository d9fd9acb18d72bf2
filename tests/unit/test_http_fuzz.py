"""Property tests over the request paths: whatever bytes arrive, the parser
raises only HTTPError, the connection never hangs or lets an exception
escape, and every byte it writes parses as well-formed HTTP/1.1 responses."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from http_helpers import BACKENDS, FakeTransport, parse_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkserve.http.parser import ParserLimits
from forkserve.http.wsgi import HTTPOptions, WSGIConnection

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
]
SPECIALS = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b"0", b";", b",", b"\x7f", b"\xff"]


@st.composite
def mutated_requests(draw: Any) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "dup"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(SPECIALS))
        elif op == "delete" and pos < len(data):
            del data[pos]
        elif op == "replace" and pos < len(data):
            data[pos : pos + 1] = draw(st.sampled_from(SPECIALS))
        elif op == "dup":
            data += data[pos:]
    return bytes(data)


requests = st.one_of(mutated_requests(), st.binary(max_size=300))


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"got ", body]


def responses_are_well_formed(wire: bytes) -> int:
    """Parse everything the server wrote as a client would; return the count."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    client.receive_data(b"")
    count = 0
    while True:
        waiting = client.their_state is h11.SEND_RESPONSE and not client.trailing_data[0]
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            # Closing an idle kept-alive connection is allowed; a cut response is not.
            assert waiting, "a response was cut short"
            break
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Response) and event.status_code >= 200:
            count += 1
        if isinstance(event, h11.EndOfMessage):
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                break
            try:
                client.start_next_cycle()
                client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
                client.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                break
    return count


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=requests, step=st.integers(1, 64))
def test_parser_raises_only_http_errors(backend: str, data: bytes, step: int) -> None:
    limits = ParserLimits(max_request_line=200, max_header_fields=10, max_header_field_size=200)
    parse_all(backend, data, step=step, limits=limits)  # HTTPError is caught inside


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=requests, step=st.integers(1, 64))
def test_connection_answers_with_well_formed_responses(
    backend: str, data: bytes, step: int
) -> None:
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    transport = FakeTransport(*pieces)
    conn = WSGIConnection(transport, app, HTTPOptions(backend=backend), ("127.0.0.1", 1), ("a", 80))
    for _ in range(len(data) + 2):  # bounded: never more requests than bytes
        if not conn.handle_request():
            break
    else:
        raise AssertionError("the connection kept going past its input")
    wire = b"".join(transport.sent)
    if wire:
        assert wire.startswith(b"HTTP/1.1 ")
        assert responses_are_well_formed(wire) >= 1
