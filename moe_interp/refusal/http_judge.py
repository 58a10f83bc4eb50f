"""HTTP client for OpenAI-compatible chat endpoints used as refusal judges (standard library only).

:class:`OpenAIChatClient` sends one user message to ``/v1/chat/completions`` and returns the reply text.
It is built to survive a slow, broken or hostile endpoint: one total deadline per call, a cap on the
response size, bounded retries with backoff on 429 / 5xx, no redirects (the API key never goes to
another URL), no proxy for loopback judges, and every transport failure raised as
:class:`JudgeBackendError` with a one-line message that names the URL and never the API key.
:class:`~moe_interp.refusal.llm_judge.OpenAIChatBackend` adds the judge prompt and label parsing on top.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import ipaddress
import json
import math
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

__all__ = ["JudgeBackendError", "OpenAIChatClient", "is_loopback_host"]

_CHUNK = 64 * 1024
_DETAIL_BYTES = 300  # how much of an error body is quoted in a message


class JudgeBackendError(RuntimeError):
    """A judge backend could not produce a reply (HTTP error, timeout, malformed response)."""


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's hostname) is ``localhost``, ``*.localhost`` or a loopback IP address."""
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_line(text: str, limit: int = 200) -> str:
    """Whitespace collapsed to single spaces and cut to ``limit`` characters (for error messages)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass


class _Deadline:
    """The wall-clock budget of one call.

    Socket timeouts bound each single read, not their sum (a server trickling a byte at a time never
    trips them), so when the budget runs out :meth:`expire` (run by a timer) shuts the live socket
    down, which makes a blocked read return at once.
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        return self.expired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> socket.socket:
        """Make ``sock`` the socket to shut down on expiry (at once if already expired)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shutdown(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shutdown(self._sock)


def _watched(conn_class: type[http.client.HTTPConnection], deadline: _Deadline) -> Any:
    """``conn_class`` registering its sockets with ``deadline``: the raw TCP socket as soon as it is
    connected (so a stalled TLS handshake or proxy tunnel is cut too) and the final one after connect."""

    class Watched(conn_class):  # type: ignore[misc, valid-type]  # a class from a variable
        _create_connection: Callable[..., socket.socket]  # socket.create_connection, set by HTTPConnection

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

        def connect(self) -> None:
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _DeadlineOpen:
    """Handler mixin: open connections whose sockets ``self.deadline`` can cut."""

    deadline: _Deadline

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        # super() is the urllib handler this mixin is combined with (object has no do_open)
        return super().do_open(_watched(http_class, self.deadline), req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_DeadlineOpen, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineOpen, urllib.request.HTTPSHandler):
    pass


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One default (verifying) TLS context per process: loading the CA certificates takes ~50 ms."""
    return ssl.create_default_context()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: a 3xx then surfaces as an ``HTTPError`` (urllib would resend the headers,
    ``Authorization`` included, to whatever host ``Location`` names)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _RetryableStatus(Exception):
    """HTTP 429 / 5xx from one attempt (internal: caught by the retry loop)."""

    def __init__(self, code: int, detail: str, retry_after: float | None) -> None:
        super().__init__(code)
        self.code, self.detail, self.retry_after = code, detail, retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class OpenAIChatClient:
    """Client of an OpenAI-compatible ``/v1/chat/completions`` endpoint (standard library only).

    ``base_url`` may be the server root (``http://host:8000``), the ``/v1`` root, or the full
    ``.../chat/completions`` URL. :meth:`complete` sends one user message (temperature 0) and returns
    the reply text. Guarantees, each against a real failure mode of remote or local servers:

    * **Deadline**: ``timeout`` is the total wall-clock budget of one :meth:`complete` call -- connect,
      TLS, headers, body, every retry and every backoff sleep -- not a per-read socket timeout (a
      server trickling one byte at a time cannot stretch it). Only name resolution is not covered.
    * **Size cap**: a response body over ``max_response_bytes`` is refused, read no further.
    * **Retries**: HTTP 429 and 5xx are retried up to ``max_retries`` times, sleeping
      ``min(max_backoff, backoff * 2**i)`` before retry ``i`` (at least ``Retry-After`` seconds when
      the server sends it; a ``Retry-After`` above ``max_backoff`` ends the call at once), never past
      the deadline. Other 4xx and connection errors are not retried.
    * **No redirects**: a 3xx answer raises; nothing is re-sent anywhere, so the API key only ever goes
      to ``self.url``'s host (POST redirects are rarely meaningful for an API; use the final URL).
    * **Proxies**: a loopback judge (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``::1``) is always
      reached directly, never through a proxy. Other hosts use ``proxies`` (a urllib mapping such as
      ``{"https": "http://proxy:3128"}``; ``{}`` = no proxy) or, if None, the environment's
      ``http_proxy`` / ``https_proxy``; ``no_proxy`` is honoured either way.
    * **Errors**: every failure (HTTP error, timeout, refused or reset connection, oversized, non-UTF-8,
      non-JSON or wrongly shaped response) raises :class:`JudgeBackendError` with a one-line message
      naming the URL; the API key is never in it. Bad arguments raise ``ValueError``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_tokens: int = 8,
        *,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_response_bytes: int = 1 << 20,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        self.url: str = self._build_url(base_url)
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        if api_key is not None and (not isinstance(api_key, str) or any(c in api_key for c in "\r\n\0")):
            raise ValueError("api_key must be None or a str without line breaks")
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"timeout must be > 0 and backoff, max_backoff >= 0, got {timeout}, {backoff}, {max_backoff}"
            )
        for name, value, low in (
            ("max_tokens", max_tokens, 1),
            ("max_retries", max_retries, 0),
            ("max_response_bytes", max_response_bytes, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if proxies is not None and not (
            isinstance(proxies, Mapping) and all(isinstance(v, str) for v in proxies.values())
        ):
            raise ValueError(f"proxies must be None or a mapping of scheme to proxy URL, got {proxies!r}")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_response_bytes = max_response_bytes
        host = urllib.parse.urlsplit(self.url).hostname
        # None = the environment's proxies (read by urllib at each call); {} = direct
        self.proxies: dict[str, str] | None = (
            {} if is_loopback_host(host) else (None if proxies is None else dict(proxies))
        )
        self._sleep = time.sleep  # replaceable in tests

    @staticmethod
    def _build_url(base_url: str) -> str:
        """Validate ``base_url`` and complete it to the ``.../chat/completions`` URL."""
        if not isinstance(base_url, str) or any(c.isspace() or ord(c) < 32 for c in base_url):
            raise ValueError(f"base_url must be an http(s) URL without whitespace, got {base_url!r}")
        parts = urllib.parse.urlsplit(base_url)
        try:
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            raise ValueError(f"base_url has an invalid port: {base_url!r}") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")
        if parts.username is not None or parts.fragment:
            raise ValueError("base_url must not contain user:password@ or a #fragment (pass api_key instead)")
        path = parts.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
        return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, ""))

    # ------------------------------------------------------------------ errors
    def _error(self, message: str) -> JudgeBackendError:
        """A :class:`JudgeBackendError` with ``message`` on one line and the API key masked."""
        message = " ".join(message.split())
        if self.api_key:
            message = message.replace(self.api_key, "***")
        return JudgeBackendError(message)

    def _timeout_error(self) -> JudgeBackendError:
        return self._error(
            f"judge endpoint {self.url} timed out after {self.timeout:g}s (total deadline per call)"
        )

    def _transport_error(self, exc: BaseException, deadline: _Deadline, reading: bool) -> JudgeBackendError:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if deadline.over() or isinstance(reason, TimeoutError):
            return self._timeout_error()
        what = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        if reading:
            return self._error(
                f"connection to judge endpoint {self.url} failed while reading the reply: {what}"
            )
        return self._error(f"could not reach judge endpoint {self.url}: {what}")

    # ------------------------------------------------------------------ transport
    def complete(self, content: str) -> str:
        """Send one user message; return the assistant reply text (``""`` for a null content)."""
        if not isinstance(content, str):
            raise ValueError(f"content must be a str, got {type(content).__name__}")
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        data = json.dumps(body).encode()
        deadline = _Deadline(self.timeout)
        timer = threading.Timer(self.timeout, deadline.expire)
        timer.daemon = True
        timer.start()
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    return self._parse(self._attempt(data, deadline))
                except _RetryableStatus as e:
                    last = e
                if attempt == self.max_retries:
                    break
                wait = min(self.max_backoff, self.backoff * 2**attempt)
                if last.retry_after is not None:
                    if last.retry_after > self.max_backoff:
                        raise self._error(
                            f"judge endpoint {self.url} returned HTTP {last.code} asking to retry after "
                            f"{last.retry_after:g}s (> max_backoff {self.max_backoff:g}s): {last.detail}"
                        )
                    wait = max(wait, last.retry_after)
                if wait >= deadline.remaining():
                    raise self._error(
                        f"judge endpoint {self.url} returned HTTP {last.code} and the {self.timeout:g}s "
                        f"deadline leaves no time to retry (attempt {attempt + 1}): {last.detail}"
                    )
                self._sleep(wait)
            raise self._error(
                f"judge endpoint {self.url} returned HTTP {last.code} on all {self.max_retries + 1} "
                f"attempts: {last.detail}"
            )
        finally:
            timer.cancel()

    def _attempt(self, data: bytes, deadline: _Deadline) -> bytes:
        """One POST: the response body, or :class:`_RetryableStatus`, or :class:`JudgeBackendError`."""
        remaining = deadline.remaining()
        if deadline.over():
            raise self._timeout_error()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        http_handler, https_handler = _HTTPHandler(), _HTTPSHandler(context=_ssl_context())
        http_handler.deadline = https_handler.deadline = deadline
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(self.proxies), _NoRedirect(), http_handler, https_handler
        )
        try:
            resp = opener.open(req, timeout=remaining)
        except urllib.error.HTTPError as e:
            self._raise_status(e)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise self._transport_error(e, deadline, reading=False) from e
        try:
            with resp:
                return self._read_capped(resp, deadline)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise self._transport_error(e, deadline, reading=True) from e

    def _raise_status(self, e: urllib.error.HTTPError) -> NoReturn:
        """Turn a non-2xx answer into :class:`_RetryableStatus` (429, 5xx) or :class:`JudgeBackendError`."""
        try:
            with e:
                detail = _one_line(e.read(_DETAIL_BYTES).decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException, ValueError):
            detail = ""
        if 300 <= e.code < 400:
            location = _one_line(e.headers.get("Location", ""))
            raise self._error(
                f"judge endpoint {self.url} redirected (HTTP {e.code}) to {location or '?'}; redirects are not "
                "followed so the API key never leaves this URL's host: use the final URL as base_url"
            ) from None
        if e.code == 429 or 500 <= e.code < 600:
            raise _RetryableStatus(e.code, detail, _retry_after(e.headers.get("Retry-After"))) from None
        raise self._error(f"judge endpoint {self.url} returned HTTP {e.code}: {detail}") from None

    def _read_capped(self, resp: Any, deadline: _Deadline) -> bytes:
        """Read the body, at most ``max_response_bytes``, within the deadline."""
        cap = self.max_response_bytes
        too_big = f"judge endpoint {self.url} sent a response larger than max_response_bytes={cap}"
        length = (resp.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > cap:
            raise self._error(f"{too_big} (Content-Length {length})")
        buf = bytearray()
        while len(buf) <= cap and not deadline.over():
            chunk = resp.read1(min(_CHUNK, cap + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
        if deadline.over():  # the watchdog's shutdown also ends a read as if at EOF
            raise self._timeout_error()
        if len(buf) > cap:
            raise self._error(too_big)
        if length.isdigit() and len(buf) < int(length):  # read1 returns b"" at a premature EOF
            raise self._error(
                f"connection to judge endpoint {self.url} failed while reading the reply: "
                f"IncompleteRead ({len(buf)} of {length} bytes)"
            )
        return bytes(buf)

    def _parse(self, raw: bytes) -> str:
        """``choices[0].message.content`` of a chat completion, checked step by step."""
        bad = f"malformed response from judge endpoint {self.url}:"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error(f"{bad} not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise self._error(f"{bad} not JSON: {_one_line(text) or '(empty body)'}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._error(f"{bad} no choices[0].message.content in {_one_line(text)}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise self._error(f"{bad} choices[0].message.content has type {type(content).__name__}, not str")
        return content
