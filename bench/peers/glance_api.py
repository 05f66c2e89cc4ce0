"""A real glance-api 33 as an upstream of the peer comparison: tests/realglance.py (from the
venv that ``make glance-venv`` builds) with the benchmark's images uploaded, and what its
access log says about them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common.glance_nginx import Route
from bench.common.images import TestImage
from bench.common.lifecycle import progress
from bench.common.procs import group_pids, run_text


class RealGlanceUpstream:
    """A real glance-api 33 from tests/realglance.py, with the bench's images uploaded."""

    def __init__(self, state_dir: Path) -> None:
        from realglance import RealGlance, glance_venv  # tests/realglance.py (see bench)

        self.venv = glance_venv()  # RuntimeError when tests/glance/setup-venv.sh never ran
        self.glance = RealGlance(state_dir, self.venv)

    def start(self) -> None:
        """Configure and start glance-api under gunicorn."""
        self.glance.start()

    def stop(self) -> None:
        """Stop gunicorn."""
        self.glance.stop()

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return str(self.glance.url)

    def upload(self, image: TestImage, count: int) -> list[Route]:
        """``count`` images with ``image``'s bytes; their ids with the hashes Glance holds."""
        with ThreadPoolExecutor(2) as pool:  # gunicorn runs 2 workers
            metas = list(pool.map(lambda index: self._create(image, index), range(count)))
        for meta in metas:
            if meta["os_hash_value"] != image.sha512:
                raise RuntimeError(f"Glance's sha512 of {meta['id']} is not the image's")
        return [Route(meta["id"], image) for meta in metas]

    def _create(self, image: TestImage, index: int, attempts: int = 3) -> dict[str, Any]:
        """Upload one image; two uploads at once now and then make Glance (sqlite) drop
        one, so a failed upload is tried again."""
        for attempt in range(1, attempts + 1):
            try:
                return dict(self.glance.create_image(image.path, name=f"bench-{index}"))
            except (OSError, RuntimeError) as exc:
                if attempt == attempts:
                    raise RuntimeError(f"uploading an image to glance-api failed: {exc}\n"
                                       f"{self.glance.logs()}") from exc
                progress(f"upload to glance-api failed ({str(exc).splitlines()[0]}); "
                         "trying again")
        raise AssertionError("unreachable")

    def pids(self) -> list[int]:
        """gunicorn's master and workers."""
        proc = self.glance._proc
        return group_pids(proc.pid) if proc is not None else []

    def data_requests(self, image_id: str) -> list[int]:
        """One -1 (bytes unknown) per data GET gunicorn logged."""
        return [-1] * self.glance.data_gets(image_id)

    def metadata_gets(self, image_id: str) -> int:
        """GET /v2/images/{id} that gunicorn logged."""
        needle = f'"GET /v2/images/{image_id} '
        return sum(needle in line for line in self.glance.access_lines())

    def version(self) -> str:
        """glance's version in its venv."""
        return run_text([str(self.venv / "bin" / "python"), "-c",
                         "import importlib.metadata as m; print(m.version('glance'))"])
