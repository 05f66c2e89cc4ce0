"""The imgcache side of the interop suite: an ``imgcache serve`` process with its log kept,
image files of random bytes, and images uploaded through imgcache by the clients."""

from __future__ import annotations

import hashlib
import os
import pathlib
import time
from collections.abc import Callable

import pytest
from processes import ImgcacheProcess
from stack import ClientRun, Clients, Reply, User, call

MiB = 1024 * 1024
#: imgcache's --decision-ttl in these tests: how long an "allowed" from Glance is reused.
DECISION_TTL = 2.0


class Imgcache(ImgcacheProcess):
    """``imgcache serve`` for the interop suite (its log is kept by ImgcacheProcess)."""

    def __init__(self, upstream: str, cache_dir: pathlib.Path, extra: tuple[str, ...]) -> None:
        super().__init__(upstream, cache_dir, max_size="1G", extra=extra)
        self.cache_dir = cache_dir

    def data_url(self, image_id: str) -> str:
        """URL of an image's data through imgcache."""
        return f"{self.url}/v2/images/{image_id}/file"

    def get(self, image_id: str, token: str) -> Reply:
        """Download an image through imgcache with a token; the whole answer."""
        return call("GET", self.data_url(image_id), headers={"X-Auth-Token": token})

    def cached_files(self) -> list[str]:
        """Names of the committed image files in the cache directory."""
        data = self.cache_dir / "data"
        return sorted(os.listdir(data)) if data.exists() else []

    def wait_committed(self, fills: int) -> None:
        """Wait until ``fills`` fills have been committed to the cache (a fill commits just
        after its readers got their last bytes)."""
        self.wait_for(lambda: self.metric('imgcache_fills_total{outcome="committed"}') >= fills,
                      f"{fills} committed fills")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll ``condition`` until it holds; fail the test with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)


class ImageFile:
    """A file of random bytes and its digests."""

    def __init__(self, path: pathlib.Path, size: int) -> None:
        sha256, sha512 = hashlib.sha256(), hashlib.sha512()
        with path.open("wb") as fh:
            left = size
            while left:
                block = os.urandom(min(left, MiB))
                fh.write(block)
                sha256.update(block)
                sha512.update(block)
                left -= len(block)
        self.path = path
        self.size = size
        self.sha256 = sha256.hexdigest()
        self.sha512 = sha512.hexdigest()
        with path.open("rb") as fh:
            self.head = fh.read(4096)


def checked(run: ClientRun, what: str) -> ClientRun:
    """Fail the test with the client's error unless the operation succeeded."""
    assert run.ok, f"{what} failed: {run.error}\n{run.stderr}"
    return run


def upload_image(clients: Clients, imgcache: Imgcache, owner: User, src: ImageFile,
                 name: str) -> str:
    """Create a private image as ``owner`` and upload ``src``, through imgcache; its id."""
    image_id = checked(clients.run("glanceclient", owner, imgcache.url, "create", name),
                       "create").result["id"]
    checked(clients.run("glanceclient", owner, imgcache.url, "upload", image_id, src.path),
            "upload")
    return str(image_id)
