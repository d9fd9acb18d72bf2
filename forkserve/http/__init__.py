"""The HTTP/1.1 layer: sans-I/O request parsing, response heads, PEP 3333.

``parser`` turns bytes into events over httptools or h11, ``response``
validates and builds response heads, ``wsgi`` drives one connection through
a transport object, ``proxy`` reads trusted proxy headers and ``accesslog``
formats access log lines. Nothing here imports sockets, threads, signals,
selectors, asyncio, click, uvicorn, or any forkserve module other than
``forkserve.errors``; the worker classes own all of that.
"""

from __future__ import annotations

from forkserve.http.accesslog import DEFAULT_FORMAT, AccessRecord, format_access
from forkserve.http.parser import (
    NEED_DATA,
    Data,
    EndOfMessage,
    NeedData,
    ParserLimits,
    Request,
    RequestParser,
    make_parser,
)
from forkserve.http.wsgi import HTTPOptions, Transport, WSGIConnection

__all__ = [
    "DEFAULT_FORMAT",
    "NEED_DATA",
    "AccessRecord",
    "Data",
    "EndOfMessage",
    "HTTPOptions",
    "NeedData",
    "ParserLimits",
    "Request",
    "RequestParser",
    "Transport",
    "WSGIConnection",
    "format_access",
    "make_parser",
]
