"""Strict validation of a request head (RFC 9112 §2-§7, RFC 9110 §5).

``parse_head`` turns the bytes of one head into a ``Request`` or raises an
``HTTPError`` carrying the status to answer with. The chunk-line and field
grammars here are shared with the parser's front end.

Imports nothing from forkserve but ``forkserve.errors`` and ``.events``.
"""

from __future__ import annotations

import re

from forkserve.errors import HTTPError

from .events import ParserLimits, Request

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_ANY_VERSION = re.compile(rb"[^ ]+ [^ ]+(?: HTTP/[0-9]+\.[0-9]+)?")
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS; no space
# before the colon, values are VCHAR / obs-text / SP / HTAB.
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
# The whole field section at once, each line as "\r\n" field-line, ending in
# "\r\n": one C-level pass validates every line, so splitting is then safe.
_FIELD_BLOCK = re.compile(rb"(?:\r\n" + _TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*)*\r\n")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[\x21-\x7e]*")
_AUTHORITY_FORM = re.compile(rb"[A-Za-z0-9.\-_~!$&'()*+,;=%\[\]:]+:[0-9]+")
# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, strict: no whitespace at all.
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)"
)
_MAX_CHUNK_LINE = 4096
_MAX_CONTENT_LENGTH = 2**63 - 1
_CRLF = b"\r\n"


def _check_line_endings(buf: bytes | bytearray, end: int, partial: bool, start: int = 0) -> None:
    """Refuse a bare LF or bare CR in ``buf[start:end]`` (RFC 9112 §2.2 lets
    a server reject them; accepting them is how request smuggling starts). A
    partial buffer may end with the CR of a CRLF still to come."""
    if start and buf[start : start + 1] == b"\n":
        start -= 1  # keep a CRLF split by the previous scan whole
    n_crlf = buf.count(_CRLF, start, end)
    if buf.count(b"\n", start, end) != n_crlf:
        raise HTTPError("bare LF in request framing; lines must end with CRLF", status=400)
    n_cr = buf.count(b"\r", start, end)
    if n_cr != n_crlf and not (partial and n_cr == n_crlf + 1 and buf[end - 1 : end] == b"\r"):
        raise HTTPError("bare CR in request framing; lines must end with CRLF", status=400)


def parse_head(head: bytes, limits: ParserLimits) -> Request:
    """Validate a complete head (without its final empty line) and return the
    Request. Raises HTTPError with the status to answer with."""
    eol = head.find(_CRLF)
    line = head if eol < 0 else head[:eol]
    if len(line) > limits.max_request_line:
        raise HTTPError("request line too long", status=414)
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        if _ANY_VERSION.fullmatch(line) and not line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
            raise HTTPError("unsupported HTTP version; use HTTP/1.1 or HTTP/1.0", status=505)
        raise HTTPError("malformed request line", status=400)
    method, target, major, minor = m.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise HTTPError("unsupported HTTP version; use HTTP/1.1 or HTTP/1.0", status=505)
    version = b"1.1" if minor == b"1" else b"1.0"
    _check_target(method, target)

    block = head[eol:] + _CRLF if eol >= 0 else b""
    if block:
        if block.count(_CRLF) - 1 > limits.max_header_fields:
            raise HTTPError("too many header fields", status=431)
        max_field = limits.max_header_field_size
        if len(block) > max_field and max(map(len, block.split(_CRLF))) > max_field:
            raise HTTPError("header field too long", status=431)
        if _FIELD_BLOCK.fullmatch(block) is None:
            raise HTTPError(_block_error(block), status=400)
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        for raw in block[2:-2].split(_CRLF):
            name, _, value = raw.partition(b":")
            append((name, value.strip(b" \t")))
        lowered = block.lower()
        hosts = lowered.count(b"\r\nhost:")
    else:
        headers = []
        lowered = b""
        hosts = 0
    cl_values: list[bytes] = []
    te_values: list[bytes] = []
    connection = b""
    expect = b""
    # Only heads that carry a framing or connection header need a second look.
    if (
        b"\r\ncontent-length:" in lowered
        or b"\r\ntransfer-encoding:" in lowered
        or b"\r\nconnection:" in lowered
        or b"\r\nexpect:" in lowered
    ):
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                cl_values.append(value)
            elif lname == b"transfer-encoding":
                te_values.append(value)
            elif lname == b"connection":
                connection = connection + b"," + value if connection else value
            elif lname == b"expect":
                expect = value

    if hosts > 1:
        raise HTTPError("more than one Host header", status=400)
    if hosts == 0 and version == b"1.1":
        raise HTTPError("missing Host header (required in HTTP/1.1)", status=400)

    content_length: int | None = None
    chunked = False
    if te_values:
        if cl_values:
            raise HTTPError("both Content-Length and Transfer-Encoding", status=400)
        if version == b"1.0":
            raise HTTPError("Transfer-Encoding in an HTTP/1.0 request", status=400)
        # Strict (RFC 9112 §6.1): the only coding accepted is exactly one
        # "chunked"; anything else cannot be framed safely.
        if len(te_values) != 1 or te_values[0].lower() != b"chunked":
            raise HTTPError("unsupported Transfer-Encoding; only 'chunked' is accepted", status=400)
        chunked = True
    elif cl_values:
        if len(cl_values) != 1:
            raise HTTPError("more than one Content-Length header", status=400)
        value = cl_values[0]
        if not value.isdigit() or not value.isascii() or len(value) > 19:
            raise HTTPError("malformed Content-Length", status=400)
        content_length = int(value)
        if content_length > _MAX_CONTENT_LENGTH:
            raise HTTPError("malformed Content-Length", status=400)
        if limits.max_body and content_length > limits.max_body:
            raise HTTPError("request body larger than the limit", status=413)

    tokens = {t.strip() for t in connection.lower().split(b",")} if connection else set()
    if version == b"1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    expect_continue = version == b"1.1" and expect.lower() == b"100-continue"
    return Request(
        method, target, version, headers, keep_alive, expect_continue, content_length, chunked
    )


def _check_target(method: bytes, target: bytes) -> None:
    """RFC 9112 §3.2: the four request-target forms, each for its methods."""
    if method == b"CONNECT":
        if _AUTHORITY_FORM.fullmatch(target) is None:
            raise HTTPError("CONNECT needs an authority-form target host:port", status=400)
    elif target[:1] == b"/":
        return
    elif target == b"*":
        if method != b"OPTIONS":
            raise HTTPError("asterisk-form target is only valid for OPTIONS", status=400)
    elif _ABSOLUTE_FORM.fullmatch(target) is None:
        raise HTTPError("malformed request target", status=400)


def _block_error(block: bytes) -> str:
    for raw in block.split(_CRLF)[1:-1]:
        if _FIELD_LINE.fullmatch(raw) is None:
            return _field_error(raw)
    return "invalid header block"


def _field_error(raw: bytes) -> str:
    if raw[:1] in (b" ", b"\t"):
        return "obsolete line folding in header (RFC 9112 §5.2)"
    colon = raw.find(b":")
    if colon < 0:
        return "header line without a colon"
    if colon > 0 and raw[colon - 1 : colon] in (b" ", b"\t"):
        return "whitespace between header name and colon (RFC 9112 §5.1)"
    if colon == 0:
        return "empty header name"
    return "invalid character in header"
