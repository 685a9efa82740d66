"""Reading an HTTP reply body with a byte cap and a wall-clock deadline.

A read timeout only bounds the gap between bytes, so a server dripping one byte at a time
would outlast it. Each read here returns whatever has arrived (urllib3's `read1`), so the
deadline is checked as the bytes come, not once per full chunk. urllib3's errors are
raised as the requests exceptions `Response.iter_content` would raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import requests
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

CHUNK_BYTES = 65536


class BodyDeadline(Exception):
    """The body was still arriving when the deadline passed."""


def declared_length(response: requests.Response) -> int | None:
    """The Content-Length, when it is plain ASCII digits ("²".isdigit() is True too)."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if declared.isascii() and declared.isdigit() else None


def read_body(
    response: requests.Response,
    limit: int,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """At most `limit + 1` bytes of the body: one byte more tells the caller it is over.

    Raises BodyDeadline past `deadline` (on `clock`), and requests' own exceptions for a
    connection that breaks or times out mid-body.
    """
    read_some = getattr(response.raw, "read1", None) or response.raw.read
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = read_some(CHUNK_BYTES, decode_content=True)
            if not chunk:
                break
            if clock() > deadline:
                raise BodyDeadline
            chunks.append(chunk)
            size += len(chunk)
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from None
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from None
    except ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from None
    except SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None
    return b"".join(chunks)[: limit + 1]
