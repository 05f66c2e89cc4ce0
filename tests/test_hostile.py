"""Hostile input: malformed and malicious requests, sent raw over sockets to a real
``imgcache serve`` process in front of a Glance stand-in process.

Every request gets a 4xx, or, when it is Glance's to judge, Glance's own status (the same
bytes are sent straight to the stand-in to learn it); never a 5xx of imgcache's own, never a
hang. After each batch the server still serves images correctly, its space accounting holds,
and no file outside the cache directory was touched (the cache directory holds nothing but
its own layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from inloop import TOKEN, Imgcache
from processes import ImgcacheProcess, StandinProcess

from imgcache.history_files import CURRENT, PREVIOUS, STATE
from imgcache.standin import GlanceStandin

MiB = 1 << 20
#: Longest a single exchange (send, read every answer) may take before it counts as a hang.
EXCHANGE_TIMEOUT = 10.0
#: Requests sent to imgcache, by kind (printed at the end with ``pytest -s``).
SENT: Counter[str] = Counter()

FUZZ = settings(
    max_examples=60, deadline=None, database=None,
    # The only function-scoped fixture is the autouse blockbuster one, a no-op for sync tests.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- a raw HTTP/1.x client -----------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP response as it came off the socket."""

    status: int
    headers: dict[str, str]  # lower-case names, latin-1 values
    body: bytes
    complete: bool  # the body ended where its framing said it would

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, body[:120]={self.body[:120]!r})"


class _Reader:
    """Reads HTTP responses from a socket; a silence past the deadline fails the test."""

    def __init__(self, sock: socket.socket, deadline: float, what: bytes) -> None:
        self.sock = sock
        self.deadline = deadline
        self.what = what
        self.buffer = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no answer within {EXCHANGE_TIMEOUT} s to {self.what[:200]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            raise AssertionError(
                f"no answer within {EXCHANGE_TIMEOUT} s to {self.what[:200]!r}") from None
        except ConnectionError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self._fill():
                return None
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _exactly(self, count: int) -> tuple[bytes, bool]:
        while len(self.buffer) < count and self._fill():
            pass
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data, len(data) == count

    def response(self, head_only: bool) -> Reply | None:
        """The next response (interim 1xx ones skipped), None if the connection ended."""
        while True:
            head = self._until(b"\r\n\r\n")
            if head is None:
                return None
            lines = head.decode("latin-1").split("\r\n")
            match = re.match(r"HTTP/\d\.\d (\d{3})", lines[0])
            assert match, f"not an HTTP status line: {lines[0]!r}"
            status = int(match.group(1))
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status >= 200:
                break
        if head_only or status in (204, 304):
            return Reply(status, headers, b"", True)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._chunked(status, headers)
        if "content-length" in headers:
            body, complete = self._exactly(int(headers["content-length"]))
            return Reply(status, headers, body, complete)
        while self._fill():
            pass
        body, self.buffer = self.buffer, b""
        return Reply(status, headers, body, True)

    def _chunked(self, status: int, headers: dict[str, str]) -> Reply:
        body = b""
        while True:
            size_line = self._until(b"\r\n")
            if size_line is None:
                return Reply(status, headers, body, False)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                self._until(b"\r\n")
                return Reply(status, headers, body, True)
            data, complete = self._exactly(size + 2)
            body += data[:size]
            if not complete:
                return Reply(status, headers, body, False)


def exchange(port: int, raw: bytes, replies: int = 1,
             head_only: tuple[bool, ...] = ()) -> list[Reply]:
    """Send ``raw`` on a new connection and read up to ``replies`` responses (fewer when the
    server closes the connection first). Fails the test if the server goes silent."""
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_TIMEOUT) as sock:
        # A server may answer and close before it read all of an oversized request.
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        reader = _Reader(sock, deadline, raw)
        answers: list[Reply] = []
        while len(answers) < replies:
            reply = reader.response(head_only[len(answers)] if head_only else
                                    raw.startswith(b"HEAD "))
            if reply is None:
                break
            answers.append(reply)
        return answers


def http(method: str | bytes = "GET", target: str | bytes = "/",
         headers: list[tuple[str | bytes, str | bytes]] | None = None, body: bytes = b"",
         version: str | bytes = "HTTP/1.1", token: str | None = TOKEN,
         close: bool = True) -> bytes:
    """The bytes of one request: Host, X-Auth-Token and Connection: close unless told."""
    def raw(text: str | bytes) -> bytes:
        return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text

    lines = [raw(method) + b" " + raw(target) + b" " + raw(version)]
    all_headers: list[tuple[str | bytes, str | bytes]] = [("Host", "imgcache")]
    if token is not None:
        all_headers.append(("X-Auth-Token", token))
    all_headers += headers or []
    if close:
        all_headers.append(("Connection", "close"))
    lines += [raw(name) + b": " + raw(value) for name, value in all_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- the stage: processes, images, and the files that must stay untouched -------------------

_DATA_NAME = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\.[0-9a-f]+")
_PARTIAL_NAME = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\.\d+\.partial")


@dataclass
class Stage:
    """imgcache and the stand-in as processes; a cached 1 MiB image; sentinel files."""

    root: Path
    cache_dir: Path
    standin: StandinProcess
    server: ImgcacheProcess
    image_id: str
    image: bytes = field(repr=False)
    unaccounted: float = 0  # cache bytes beyond the entries' (leaked by an earlier test)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def glance_port(self) -> int:
        return int(self.standin.url.rsplit(":", 1)[1])

    def ask_both(self, raw: bytes, kind: str) -> tuple[Reply | None, Reply | None]:
        """The first answer of imgcache and of Glance itself to the same bytes."""
        SENT[kind] += 1
        mine = exchange(self.port, raw)
        glances = exchange(self.glance_port, raw)
        return (mine[0] if mine else None), (glances[0] if glances else None)

    def new_image(self, size: int = MiB) -> tuple[str, bytes]:
        """A new active image in the stand-in (created and uploaded through its API)."""
        headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
        created = urllib.request.Request(self.standin.url + "/v2/images", method="POST",
                                         data=b'{"name": "hostile"}', headers=headers)
        with urllib.request.urlopen(created, timeout=30) as response:
            image_id = json.load(response)["id"]
        data = os.urandom(size)
        upload = urllib.request.Request(
            f"{self.standin.url}/v2/images/{image_id}/file", method="PUT", data=data,
            headers={"X-Auth-Token": TOKEN, "Content-Type": "application/octet-stream"})
        urllib.request.urlopen(upload, timeout=30).close()
        return image_id, data

    def outside_cache(self) -> dict[str, tuple[int, int]]:
        """Every path under the root but outside the cache dir: (size, mtime ns)."""
        seen = {}
        for directory, subdirs, files in os.walk(self.root):
            if Path(directory) == self.cache_dir:
                subdirs.clear()
                continue
            for name in subdirs + files:
                path = Path(directory, name)
                if path == self.cache_dir:
                    continue
                info = path.lstat()
                seen[str(path.relative_to(self.root))] = (info.st_size, info.st_mtime_ns)
        return seen

    def strays_in_cache(self) -> list[str]:
        """Whatever in the cache dir is not its own layout: data/, partial/, index/ and
        history/ (the access history's files)."""
        strays = [p.name for p in self.cache_dir.iterdir()
                  if p.name not in ("data", "partial", "index", "history") or not p.is_dir()]
        history = self.cache_dir / "history"
        strays += [f"history/{p.name}" for p in (history.iterdir() if history.exists() else ())
                   if p.name not in (CURRENT, PREVIOUS, STATE) or not p.is_file()]
        strays += [f"data/{p.name}" for p in (self.cache_dir / "data").iterdir()
                   if not _DATA_NAME.fullmatch(p.name) or not p.is_file()]
        strays += [f"partial/{p.name}" for p in (self.cache_dir / "partial").iterdir()
                   if not _PARTIAL_NAME.fullmatch(p.name)]
        return strays

    @contextlib.contextmanager
    def untouched(self) -> Iterator[None]:
        """Assert that nothing outside the cache dir changed, and no stray is inside it."""
        before = self.outside_cache()
        yield
        assert self.outside_cache() == before
        assert self.strays_in_cache() == []

    def metric(self, sample: str) -> float:
        return self.server.metric(sample)

    def assert_still_serving(self) -> None:
        """A normal download is still right, no fill is stuck, no reservation leaked."""
        reply = exchange(self.port, http(target=f"/v2/images/{self.image_id}/file"))[0]
        assert (reply.status, reply.headers["x-cache-status"]) == (200, "HIT")
        assert reply.complete and reply.body == self.image
        deadline = time.monotonic() + 10
        while self.metric("imgcache_fills_in_progress") > 0:
            assert time.monotonic() < deadline, "a fill is still in progress"
            time.sleep(0.05)
        assert self.newly_reserved_for_nothing() == 0

    def newly_reserved_for_nothing(self) -> float:
        """Cache bytes counted beyond the entries' since the last look: every cached image
        here is 1 MiB, so anything else is a reservation that leaked."""
        before, self.unaccounted = self.unaccounted, (
            self.metric("imgcache_cache_bytes") - self.metric("imgcache_cache_entries") * MiB)
        return self.unaccounted - before


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    root = tmp_path_factory.mktemp("hostile")
    cache_dir = root / "nest" / "deeper" / "cache"
    cache_dir.parent.mkdir(parents=True)
    for sentinel in (root / "sentinel", root / "nest" / "sentinel",
                     root / "nest" / "deeper" / "sentinel"):
        sentinel.write_text("must stay as it is\n")
    standin = StandinProcess(root / "glance", "1M")
    server = ImgcacheProcess(standin.url, cache_dir, max_size="1G")
    try:
        path = f"/v2/images/{standin.image_id}/file"
        image = exchange(int(standin.url.rsplit(":", 1)[1]), http(target=path))[0].body
        reply = exchange(server.port, http(target=path))[0]
        assert reply.status == 200 and reply.complete and reply.body == image
        assert len(image) == standin.size
        server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
        yield Stage(root, cache_dir, standin, server, standin.image_id, image)
    finally:
        log = server.stop()
        standin.stop()
        print(f"\nhostile requests sent to imgcache: {dict(SENT)}, total {sum(SENT.values())}")
        print("imgcache tracebacks:", log.count("Traceback"))


def assert_4xx_or_glances(reply: Reply | None, glance: Reply | None,
                          image: bytes | None = None) -> None:
    """imgcache's answer is a 4xx, or carries the status Glance gave to the same bytes; if
    that is a 200 of image data (``image`` given), the whole image came back."""
    assert reply is not None, "imgcache closed the connection without an answer"
    if 400 <= reply.status < 500:
        return
    assert glance is not None and reply.status == glance.status, (reply, glance)
    if image is not None and reply.status == 200:
        assert reply.complete and reply.body == image, reply


# -- image ids: traversal, encodings, control bytes -----------------------------------------

_ID_FRAGMENTS = [
    "..", ".", "/", "\\", "%2e", "%2E", "%2f", "%2F", "%5c", "%252e", "%252f", "%00", "%c0%ae",
    "%e0%80%ae", "..;", "%2e%2e%2f", "..%2F", "....//", "~", "sentinel", "etc", "passwd",
    "data", "partial", "index", "cache.db", "\x00", "\x01", "\x1b", "\x7f", "\t", " ", "\xff",
    "é", "?", "#", "&", ";", "%", "%%", "%zz", "*", "file", "a" * 300,
    "{id}", "{ID}", "{id-1}", "{id+0}",  # spellings of the cached image's id
]
IMAGE_IDS = st.lists(st.sampled_from(_ID_FRAGMENTS) | st.text(max_size=6), min_size=1,
                     max_size=8).map("".join).filter(lambda s: not re.search(r"[\r\n]", s))


def spell(raw_id: str, image_id: str) -> str:
    """Put the image's id, or a near miss of it, where a generated id names it."""
    return (raw_id.replace("{id}", image_id).replace("{ID}", image_id.upper())
            .replace("{id-1}", image_id[:-1]).replace("{id+0}", image_id + "0"))


@given(raw_id=IMAGE_IDS)
@settings(FUZZ, max_examples=120)
@example(raw_id="../../../sentinel")
@example(raw_id="..%2F..%2F..%2Fsentinel")
@example(raw_id="%2e%2e%2f%2e%2e%2f%2e%2e%2fsentinel")
@example(raw_id="%252e%252e%252fsentinel")
@example(raw_id="..\\..\\..\\sentinel")
@example(raw_id="%2e%2e")
@example(raw_id="../../nest/deeper/sentinel")
@example(raw_id="..%2f{id}")
@example(raw_id="{ID}")
def test_hostile_image_ids_get_a_4xx_or_glances_answer_and_touch_no_file(
    stage: Stage, raw_id: str
) -> None:
    raw_id = spell(raw_id, stage.image_id)
    with stage.untouched():
        reply, glance = stage.ask_both(http(target=f"/v2/images/{raw_id}/file"), "image id")
    if reply is not None and reply.status == 200:
        # A spelling of the cached image's id (say in capitals): the whole image, read
        # with Glance's consent for that image, is a right answer too.
        assert reply.complete and reply.body == stage.image, reply
    else:
        assert_4xx_or_glances(reply, glance, stage.image)


def test_non_uuid_ids_are_refused_by_imgcache_itself(stage: Stage) -> None:
    for raw_id in ["%2e%2e", "%252e%252e%252f", "a%00b", "%ff", "x" * 1000, "{id}",
                   stage.image_id + "0", stage.image_id[:-1], stage.image_id.replace("-", ""),
                   "\\..\\..\\sentinel", "..%5c..%5csentinel"]:
        SENT["non-uuid id"] += 1
        reply = exchange(stage.port, http(target=f"/v2/images/{raw_id}/file"))[0]
        assert reply.status == 400, (raw_id, reply)
        assert json.loads(reply.body)["error"]["code"] == 400
    stage.assert_still_serving()


# -- Range headers ----------------------------------------------------------------------------

_HUGE = 19  # digits beyond any image size; imgcache may call such a range malformed (416)


def _number(digits: str) -> float:
    """The value of an ASCII digit string; infinity when it is longer than any file size."""
    return math.inf if len(digits.lstrip("0")) > _HUGE else int(digits)


def glance_range_answers(value: str, size: int) -> set[int | tuple[int, int, int]]:
    """The answers allowed to ``Range: value`` on an image of ``size`` bytes: Glance's
    (webob's) rules over the header's bytes, which are ASCII digits and spaces; a status,
    or (206, first, last). A number too long for any file may also be called malformed."""
    if re.search(r"[^\t\x20-\x7e]", value):  # control or non-ASCII bytes: not a range
        return {400, 416}
    if "," in value:
        return {400}
    match = re.fullmatch(r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*",
                         value, re.IGNORECASE)
    if match is None or match.group(1) == match.group(2) == "":
        return {416}
    first, last = match.group(1), match.group(2)
    answers: set[int | tuple[int, int, int]] = set()
    if max(len(first), len(last)) > _HUGE:
        answers.add(416)
    if first == "":  # a suffix: the last N bytes
        count = _number(last)
        if count == 0:
            return {416}
        answers.add((206, int(max(0, size - count)), size - 1))
        return answers
    start, end = _number(first), _number(last) if last else size - 1
    if start >= size or end < start:
        answers.add(416)
    else:
        answers.add((206, int(start), int(min(end, size - 1))))
    return answers


_RANGE_PIECES = [
    "bytes", "BYTES", "Bytes", "items", "=", "-", "--", ",", " ", "\t", "0", "1", "7", "99",
    "1048575", "1048576", "1048577", "9" * 25, "0" * 30 + "5", "9" * 5000, "-5", ",0-1" * 500,
    "\u0661", "\uff11", "\U0001d7d9", "\u0660", "\xa0", "\u2003", ";", "bytes=", "bytes=0-",
    "\x01", "\x7f", "é",
]
_NUMBERS = (st.integers(0, 3 * MiB).map(str) | st.sampled_from(["", "9" * 40, "9" * 3000])
            | st.text(alphabet="0123456789\u0661\uff11\u0663-", max_size=8))
RANGES = (
    st.lists(st.sampled_from(_RANGE_PIECES), min_size=1, max_size=8).map("".join)
    | st.builds("bytes={}-{}".format, _NUMBERS, _NUMBERS)
    | st.text(max_size=40)
).filter(lambda v: not re.search(r"[\r\n\x00]", v))


@given(value=RANGES)
@settings(FUZZ, max_examples=120)
@example(value="bytes=\u0661-")  # ARABIC-INDIC DIGIT ONE: a digit to Python's \d, not to HTTP
@example(value="bytes=\uff11-\uff12")  # FULLWIDTH DIGITS
@example(value="bytes=\xa00-3")  # NO-BREAK SPACE, not HTTP whitespace
@example(value="bytes=" + "9" * 5000 + "-")
@example(value="bytes=-" + "9" * 5000)
@example(value="bytes=0-1," * 3000)
@example(value="bytes=-5-3")
@example(value="bytes=--5")
def test_range_headers_get_glances_answer_or_a_4xx(stage: Stage, value: str) -> None:
    SENT["range"] += 1
    reply = exchange(stage.port, http(target=f"/v2/images/{stage.image_id}/file",
                                      headers=[("Range", value)]))[0]
    allowed = glance_range_answers(value, len(stage.image))
    if reply.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", reply.headers["content-range"])
        assert match and int(match.group(3)) == len(stage.image), reply
        first, last = int(match.group(1)), int(match.group(2))
        assert (206, first, last) in allowed, (value, reply, allowed)
        assert reply.complete and reply.body == stage.image[first:last + 1]
    else:
        assert reply.status in allowed, (value, reply, allowed)


def test_a_second_range_header_is_not_a_way_around_the_one_range_rule(stage: Stage) -> None:
    """Glance behind a WSGI server sees two Range headers as one, comma-joined: 400."""
    SENT["range"] += 1
    reply = exchange(stage.port, http(target=f"/v2/images/{stage.image_id}/file",
                                      headers=[("Range", "bytes=0-1"), ("Range", "bytes=5-9")]))
    assert reply[0].status in (400, 416), reply


# -- header and query bytes ----------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(["X-Auth-Token", "X-Custom", "Accept", "If-Range",
                                 "X-Image-Meta-Name", "Content-Type", "Cookie"]) | st.text(
    alphabet="abcXYZ-_.!#$%&'*+^`|~0123456789:\x00\x7f é", min_size=1, max_size=12)
_HEADER_VALUES = st.binary(max_size=60).filter(lambda v: b"\r" not in v and b"\n" not in v)


@given(name=_HEADER_NAMES, value=_HEADER_VALUES, query=st.binary(max_size=30))
@FUZZ
@example(name="X-Auth-Token", value=TOKEN.encode() + b"\xff", query=b"")
@example(name="X-Custom", value=b"caf\xc3\xa9\xfe", query=b"")
@example(name="X-Auth-Token", value=TOKEN.encode() + b"\x00", query=b"")
@example(name="X-Custom", value=b"\x01\x02\x1b[31m", query=b"a=%00%0d%0a")
@example(name="X-Custom", value=b"ok", query=b"a=\x00&b=\x7f")
def test_odd_header_and_query_bytes_get_a_4xx_or_glances_answer(
    stage: Stage, name: str, value: bytes, query: bytes
) -> None:
    """Control characters, NUL, bytes that are not UTF-8: Glance judges the bytes the client
    sent (a token imgcache would alter is a token Glance never saw), or imgcache refuses."""
    target = f"/v2/images/{stage.image_id}/file".encode() + (b"?" + query if query else b"")
    token = None if name.lower() == "x-auth-token" else TOKEN
    reply, glance = stage.ask_both(http(target=target, headers=[(name, value)], token=token),
                                   "header/query bytes")
    assert_4xx_or_glances(reply, glance, stage.image)


# -- methods ------------------------------------------------------------------------------------

_METHODS = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True) | st.sampled_from(
    ["HEAD", "POST", "PUT", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "MKCOL", "LOCK",
     "SEARCH", "PRI", "get", "G\x00T", "GET\x7f", "GÉT", "G ET", "", "M" * 70000])


@given(method=_METHODS, which=st.sampled_from(["data", "image", "images", "other"]))
@FUZZ
@example(method="BREW", which="data")
@example(method="PUT", which="data")
@example(method="DELETE", which="data")
@example(method="HEAD", which="data")
@example(method="M" * 70000, which="data")
def test_odd_methods_get_glances_answer_or_a_4xx(stage: Stage, method: str, which: str) -> None:
    target = {"data": f"/v2/images/{stage.image_id}/file", "image": f"/v2/images/{stage.image_id}",
              "images": "/v2/images", "other": "/v1/whatever?x=1"}[which]
    if method == "DELETE" and which == "image":
        method = "DELETE-NOT"  # would delete the test's image in the stand-in
    reply, glance = stage.ask_both(http(method, target), "method")
    assert_4xx_or_glances(reply, glance)
    stage.assert_still_serving()


# -- listed attacks: smuggling, oversized, odd framing, request targets --------------------------


def _listed_cases(image_id: str) -> dict[str, bytes]:
    data = f"/v2/images/{image_id}/file"
    echo = "/_standin/echo"
    smuggled = http(target=data)
    big = "a" * (70 * 1024)
    return {
        # Request smuggling: two framings, or a framing only one reader would honour. The
        # smuggled request would read the image with a token the front request never showed.
        "CL.TE": http("POST", echo, headers=[
            ("Content-Length", str(5 + len(smuggled))), ("Transfer-Encoding", "chunked")],
            body=b"0\r\n\r\n" + smuggled, close=False),
        "TE.CL": http("POST", echo, headers=[("Transfer-Encoding", "chunked"),
                                             ("Content-Length", "4")],
                      body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled), close=False),
        "CL+TE on a GET": http(target=data, headers=[("Content-Length", "5"),
                                                     ("Transfer-Encoding", "chunked")],
                               body=b"0\r\n\r\n"),
        "two Content-Length": http("POST", echo, headers=[("Content-Length", "5"),
                                                          ("Content-Length", "6")],
                                   body=b"abcdef"),
        "two equal Content-Length": http("POST", echo, headers=[("Content-Length", "3"),
                                                                ("Content-Length", "3")],
                                         body=b"abc"),
        "Content-Length list": http("POST", echo, headers=[("Content-Length", "3, 3")],
                                    body=b"abc"),
        "TE chunked, identity": http("POST", echo, headers=[
            ("Transfer-Encoding", "chunked, identity")], body=b"0\r\n\r\n"),
        "TE xchunked": http("POST", echo, headers=[("Transfer-Encoding", "xchunked")],
                            body=b"0\r\n\r\n"),
        "TE with space before colon": http("POST", echo, headers=[
            ("Transfer-Encoding ", "chunked")], body=b"0\r\n\r\n"),
        "obs-fold in TE": http("POST", echo, headers=[("Transfer-Encoding", "\r\n chunked")],
                               body=b"0\r\n\r\n"),
        "obs-fold in a header": http(target=data, headers=[("X-Custom", "a\r\n folded")]),
        "obs-fold in the token": http(target=data, token=f"{TOKEN}\r\n\tmore"),
        "chunk size overflow": http("POST", echo, headers=[("Transfer-Encoding", "chunked")],
                                    body=b"f" * 40 + b"\r\nabc\r\n0\r\n\r\n"),
        "chunk size negative": http("POST", echo, headers=[("Transfer-Encoding", "chunked")],
                                    body=b"-5\r\nabcde\r\n0\r\n\r\n"),
        "bare LF line ends": http(target=data).replace(b"\r\n", b"\n"),
        "bare CR in a header": http(target=data, headers=[("X-Custom", "a\rb")]),
        "TE on HTTP/1.0": http("POST", echo, version="HTTP/1.0", headers=[
            ("Transfer-Encoding", "chunked")], body=b"0\r\n\r\n"),
        # Absurd Content-Length on a GET: imgcache must not wait for a body it does not need.
        "Content-Length 10**20 on a GET": http(target=data, headers=[
            ("Content-Length", "1" + "0" * 20)]),
        "Content-Length 2**63 on a GET": http(target=data, headers=[
            ("Content-Length", str(2**63))]),
        "Content-Length 10**12 on a GET, no body": http(target=data, headers=[
            ("Content-Length", str(10**12))]),
        "Content-Length -1": http(target=data, headers=[("Content-Length", "-1")]),
        "Content-Length +5": http(target=data, headers=[("Content-Length", "+5")], body=b"hello"),
        "Content-Length hex": http(target=data, headers=[("Content-Length", "0x10")]),
        # Oversized request heads (imgcache's limit is 64 KiB per line and per header).
        "request line > 64 KiB": http(target=f"/v2/images/{big}/file"),
        "query > 64 KiB": http(target=f"{data}?q={big}"),
        "header value > 64 KiB": http(target=data, headers=[("X-Custom", big)]),
        "header name > 64 KiB": http(target=data, headers=[(f"X-{big}", "1")]),
        "token > 64 KiB": http(target=data, token=big),
        "Range > 64 KiB": http(target=data, headers=[("Range", "bytes=0-1," + big)]),
        "200 headers of 1 KiB": http(target=data, headers=[
            (f"X-H{i}", "v" * 1024) for i in range(200)]),
        "5000 tiny headers": http(target=data, headers=[(f"X-{i}", "1") for i in range(5000)]),
        # Versions, Host, request targets.
        "HTTP/1.0 without Host": f"GET {data} HTTP/1.0\r\nX-Auth-Token: {TOKEN}\r\n\r\n"
                                 .encode(),
        "HTTP/1.0 metadata without Host": f"GET /v2/images/{image_id} HTTP/1.0\r\n"
                                          f"X-Auth-Token: {TOKEN}\r\n\r\n".encode(),
        "HTTP/1.1 without Host": f"GET {data} HTTP/1.1\r\nX-Auth-Token: {TOKEN}\r\n"
                                 "Connection: close\r\n\r\n".encode(),
        "two Host headers": http(target=data, headers=[("Host", "evil.example")]),
        "HTTP/0.9 style": f"GET {data}\r\n\r\n".encode(),
        "HTTP/2.0 version": http(target=data, version="HTTP/2.0"),
        "HTTP/1.2 version": http(target=data, version="HTTP/1.2"),
        "HTTP/9.9 version": http(target=data, version="HTTP/9.9"),
        "garbage version": http(target=data, version="HTTX/1.1"),
        "asterisk target": http(target="*"),
        "CONNECT authority": http("CONNECT", "evil.example:443"),
        "absolute-form pass-through": http(target="http://evil.example/v2/images"),
        "absolute-form with userinfo": http(target="http://a@127.0.0.1:1/v2/images"),
        "absolute-form image data": http(target=f"http://evil.example{data}"),
        "target starting with @": http(target="@127.0.0.1:1/v2/images"),
        "target without slash": http(target="v2/images"),
        "double slash target": http(target="//evil.example/v2/images"),
        "fragment in target": http(target=f"{data}#frag"),
        "Expect 100-continue on a GET": http(target=data, headers=[("Expect", "100-continue")]),
        "Upgrade websocket": http(target=data, headers=[("Upgrade", "websocket"),
                                                        ("Connection", "Upgrade")]),
        "h2c preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "NUL in the request line": http(target=f"/v2/images/{image_id}\x00/file"),
        "ESC in the path": http(target=f"/v2/images/\x1b[2J{image_id}/file"),
        "DEL in a header name": http(target=data, headers=[("X-\x7f", "1")]),
        "empty header name": http(target=data, headers=[("", "1")]),
        "CRLFs before the request": b"\r\n" * 100 + http(target=data),
        "CRLF in the path": http(target="/v2/images/x\r\nX-Injected: 1\r\n/file"),
        "binary noise": bytes(range(256)) * 4,
        "TLS client hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(160),
    }


def test_listed_attacks_get_a_4xx_or_glances_answer(stage: Stage) -> None:
    cases = _listed_cases(stage.image_id)
    failures = []
    with stage.untouched():
        for name, raw in cases.items():
            reply, glance = stage.ask_both(raw, "listed attack")
            on_data_path = f"{stage.image_id}/file".encode() in raw
            try:
                assert_4xx_or_glances(reply, glance, stage.image if on_data_path else None)
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    stage.assert_still_serving()


def test_absolute_form_on_a_cold_image_is_served_or_refused_and_leaks_no_space(
    stage: Stage
) -> None:
    """RFC 9112 3.2.2: a server must accept the absolute form. Either way, a cold image
    must not leave a fill behind that never ends or space reserved for nothing."""
    image_id, data = stage.new_image()
    with stage.untouched():
        reply, glance = stage.ask_both(
            http(target=f"http://glance.example/v2/images/{image_id}/file"), "listed attack")
    leaked = stage.newly_reserved_for_nothing()
    assert_4xx_or_glances(reply, glance, data)
    assert leaked == 0
    stage.assert_still_serving()


def test_a_case_variant_id_of_a_cold_image_gets_the_image_or_a_4xx(stage: Stage) -> None:
    """imgcache asks Glance about the id in lower case; the download must be of that same
    image, not of the spelling in the URL (Glance may not know it: a 200 then a cut)."""
    image_id, data = stage.new_image()
    SENT["case variant"] += 1
    reply = exchange(stage.port, http(target=f"/v2/images/{image_id.upper()}/file"))[0]
    if reply.status == 200:
        assert reply.complete and reply.body == data, reply
    else:
        assert 400 <= reply.status < 500, reply
    stage.assert_still_serving()


def test_pipelined_requests_are_answered_in_order(stage: Stage) -> None:
    data = f"/v2/images/{stage.image_id}/file"
    wanted: list[tuple[bytes, int, bytes | None]] = [
        (http(target=data, close=False), 200, stage.image),
        (http(target=data, headers=[("Range", "bytes=10-19")], close=False), 206,
         stage.image[10:20]),
        (http(target="/v2/images/..%2F..%2Fsentinel/file", close=False), 404, None),  # Glance's
        (http(target="/v2/images/not-a-uuid/file", close=False), 400, None),
        (http(target=data, headers=[("Range", "bytes=0-1,3-4")], close=False), 400, None),
        (http("PROPFIND", data, close=False), 405, None),  # Glance's
        (http(target=f"/v2/images/{stage.image_id}", close=False), 200, None),
        (http(target=data, token="not-a-token", close=False), 401, None),
        (http(target=data, headers=[("Range", "bytes=-5")], close=False), 206,
         stage.image[-5:]),
    ] * 5
    raw = b"".join(request for request, _, _ in wanted) + http(target="/v2/images")
    with stage.untouched():
        replies = exchange(stage.port, raw, replies=len(wanted) + 1)
    SENT["pipelined"] += len(wanted) + 1
    assert len(replies) == len(wanted) + 1
    for (_, status, body), reply in zip(wanted, replies, strict=False):
        assert reply.status == status, reply
        if body is not None:
            assert reply.complete and reply.body == body
    assert replies[-1].status == 200
    stage.assert_still_serving()


def test_pipelined_burst_of_hostile_requests_leaves_the_server_serving(stage: Stage) -> None:
    """One connection, 100 bad ranges back to back: 100 refusals in order, no hang."""
    bad = [http(target=f"/v2/images/{stage.image_id}/file", headers=[("Range", r)],
                close=False)
           for r in ("bytes=x", "bytes=9" + "9" * 40 + "-", "bytes=-0", "bytes=0-1,2-3")]
    raw = b"".join(bad[i % len(bad)] for i in range(100))
    replies = exchange(stage.port, raw, replies=100)
    SENT["pipelined"] += 100
    assert len(replies) == 100
    assert all(reply.status in (400, 416) for reply in replies)
    stage.assert_still_serving()


# -- a case variant must not break the download others joined (in-loop) ----------------------


class SlowToAuthorizeGlance(GlanceStandin):
    """Answers image metadata GETs (imgcache's authorization) after 0.3 s: requests that
    arrive meanwhile share the one answer and go on together, in the order they came."""

    async def _show_image(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return await super()._show_image(request)


@pytest.fixture
async def glance(glance_dir: Path) -> AsyncIterator[GlanceStandin]:
    """Overrides conftest's for the in-loop test below."""
    standin = SlowToAuthorizeGlance(glance_dir, tokens=(TOKEN,))
    await standin.start()
    yield standin
    await standin.stop()


async def test_a_case_variant_request_does_not_abort_the_download_others_joined(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    """The capitalised request starts the fill, the canonical one joins it: the canonical
    one gets the whole image whatever becomes of the other."""
    image = await glance.add_image(size=2 * MiB)
    data = await asyncio.to_thread(Path(image.path or "").read_bytes)
    headers = {"X-Auth-Token": TOKEN}

    async def download(image_id: str) -> tuple[int, bytes] | BaseException:
        try:
            async with imgcache.session.get(imgcache.data_url(image_id),
                                            headers=headers) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            return exc

    variant = asyncio.create_task(download(image.id.upper()))
    await asyncio.sleep(0.1)  # Glance is still thinking about the first one
    canonical = await download(image.id)
    assert canonical == (200, data), canonical
    other = await variant  # refused, cut off, or the image; never another body
    assert not isinstance(other, tuple) or other[0] != 200 or other[1] == data
