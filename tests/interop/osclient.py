"""One image-API operation with a real OpenStack client, for the interop suite.

Run it with the OpenStack venv's python (tests/glance/setup-venv.sh), never the project's:

    osclient.py --client glanceclient|sdk --endpoint URL --auth-url URL --username U
                --password P --project P [--token T ...] OP ARGS...

    OP: create NAME [--visibility V] | upload ID FILE | list | show ID |
        download ID OUT [--parallel N] | share ID PROJECT_ID | accept ID PROJECT_ID

python-glanceclient talks to ENDPOINT with a token, as Nova does (parallel client i uses the
i-th --token, round robin); openstacksdk
authenticates against Keystone with the password and has its image endpoint overridden to
ENDPOINT. Both verify a download against the image's os_hash_value themselves.

Prints one JSON line: {"ok", "result", "error", "status", "http"}, where "http" lists every
HTTP request the client made (method, url, status, X-Cache-Status). Exits 0 when the operation
succeeded, 1 when the client raised (the JSON says what).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import threading
from typing import Any

HTTP_LOG: list[dict[str, Any]] = []


def record(response: Any, *args: Any, **kwargs: Any) -> None:
    """A requests response hook: remember what was asked and what came back."""
    HTTP_LOG.append({
        "method": response.request.method,
        "url": response.request.url,
        "status": response.status_code,
        "cache_status": response.headers.get("X-Cache-Status"),
    })


def status_of(exc: BaseException) -> int | None:
    """The HTTP status a client exception carries, if any."""
    for attr in ("code", "status_code", "http_status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return None


class GlanceClient:
    """python-glanceclient v2 with a token and an endpoint, as Nova uses it."""

    def __init__(self, args: argparse.Namespace, index: int = 0) -> None:
        import glanceclient

        token = args.token[index % len(args.token)]
        self.client = glanceclient.Client("2", endpoint=args.endpoint, token=token)
        self.client.http_client.session.hooks["response"].append(record)

    @staticmethod
    def image(img: Any) -> dict[str, Any]:
        """The fields of an image the tests look at."""
        keys = ("id", "name", "status", "size", "checksum", "os_hash_algo", "os_hash_value",
                "visibility", "owner")
        return {k: img.get(k) for k in keys}

    def create(self, name: str, visibility: str) -> dict[str, Any]:
        """Create an image without data."""
        return self.image(self.client.images.create(
            name=name, disk_format="raw", container_format="bare", visibility=visibility))

    def upload(self, image_id: str, path: pathlib.Path) -> dict[str, Any]:
        """Upload the file's bytes (glanceclient sends them chunked, streamed)."""
        with path.open("rb") as fh:
            self.client.images.upload(image_id, fh, image_size=path.stat().st_size)
        return self.show(image_id)

    def list(self) -> list[str]:
        """Ids of the images the caller can list."""
        return [img["id"] for img in self.client.images.list()]

    def show(self, image_id: str) -> dict[str, Any]:
        """An image's metadata."""
        return self.image(self.client.images.get(image_id))

    def download(self, image_id: str, out: pathlib.Path) -> None:
        """Write the image's bytes to out; glanceclient verifies them after the last chunk."""
        body = self.client.images.data(image_id)
        if body is None:
            raise RuntimeError(f"image {image_id} has no data")
        with out.open("wb") as fh:
            for chunk in body:
                fh.write(chunk)

    def share(self, image_id: str, project_id: str) -> None:
        """Make the image shared and add the project as a member."""
        self.client.images.update(image_id, visibility="shared")
        self.client.image_members.create(image_id, project_id)

    def accept(self, image_id: str, project_id: str) -> None:
        """Accept the membership of the caller's project."""
        self.client.image_members.update(image_id, project_id, "accepted")


class SdkClient:
    """openstacksdk, authenticated by password, its image endpoint overridden."""

    def __init__(self, args: argparse.Namespace, index: int = 0) -> None:
        import openstack

        self.conn = openstack.connect(
            auth_url=args.auth_url, username=args.username, password=args.password,
            project_name=args.project, user_domain_name="Default",
            project_domain_name="Default", region_name="RegionOne",
            image_endpoint_override=args.endpoint,
            load_yaml_config=False, load_envvars=False,
        )
        self.conn.session.session.hooks["response"].append(record)

    @staticmethod
    def image(img: Any) -> dict[str, Any]:
        """The fields of an image the tests look at, under Glance's names."""
        return {
            "id": img.id, "name": img.name, "status": img.status, "size": img.size,
            "checksum": img.checksum, "os_hash_algo": img.hash_algo,
            "os_hash_value": img.hash_value, "visibility": img.visibility,
            "owner": img.owner_id,
        }

    def create(self, name: str, visibility: str) -> dict[str, Any]:
        """Create an image without data."""
        return self.image(self.conn.image.create_image(
            name=name, disk_format="raw", container_format="bare", visibility=visibility,
            allow_duplicates=True))

    def upload(self, image_id: str, path: pathlib.Path) -> dict[str, Any]:
        """Upload the file's bytes (requests streams a file object)."""
        image = self.conn.image.get_image(image_id)
        with path.open("rb") as fh:
            image.data = fh
            image.upload(self.conn.image)
        return self.show(image_id)

    def list(self) -> list[str]:
        """Ids of the images the caller can list."""
        return [img.id for img in self.conn.image.images()]

    def show(self, image_id: str) -> dict[str, Any]:
        """An image's metadata."""
        return self.image(self.conn.image.get_image(image_id))

    def download(self, image_id: str, out: pathlib.Path) -> None:
        """Write the image's bytes to out; the sdk verifies them after the last chunk."""
        self.conn.image.download_image(image_id, stream=True, output=str(out))

    def share(self, image_id: str, project_id: str) -> None:
        """Make the image shared and add the project as a member."""
        self.conn.image.update_image(image_id, visibility="shared")
        self.conn.image.add_member(image_id, member_id=project_id)

    def accept(self, image_id: str, project_id: str) -> None:
        """Accept the membership of the caller's project."""
        self.conn.image.update_member(project_id, image_id, status="accepted")


CLIENTS = {"glanceclient": GlanceClient, "sdk": SdkClient}


def sha256_of(path: pathlib.Path) -> str:
    """The sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_many(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.parallel`` clients, each with its own connection, download at once."""
    results: list[dict[str, Any]] = [{} for _ in range(args.parallel)]
    start = threading.Barrier(args.parallel)

    def one(index: int) -> None:
        out = args.out if args.parallel == 1 else args.out.with_name(f"{args.out.name}.{index}")
        try:
            client = CLIENTS[args.client](args, index)
            start.wait(timeout=120)
            client.download(args.image_id, out)
            results[index] = {"ok": True, "bytes": out.stat().st_size, "sha256": sha256_of(out)}
        except Exception as exc:  # every client's failure is reported, not raised
            start.abort()  # the others must not wait for this one at the barrier
            out.unlink(missing_ok=True)
            results[index] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "status": status_of(exc)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--auth-url", required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--token", action="append", default=[])
    ops = parser.add_subparsers(dest="op", required=True)
    create = ops.add_parser("create")
    create.add_argument("name")
    create.add_argument("--visibility", default="private")
    upload = ops.add_parser("upload")
    upload.add_argument("image_id")
    upload.add_argument("file", type=pathlib.Path)
    ops.add_parser("list")
    show = ops.add_parser("show")
    show.add_argument("image_id")
    download = ops.add_parser("download")
    download.add_argument("image_id")
    download.add_argument("out", type=pathlib.Path)
    download.add_argument("--parallel", type=int, default=1)
    for name in ("share", "accept"):
        member = ops.add_parser(name)
        member.add_argument("image_id")
        member.add_argument("project_id")
    return parser.parse_args(argv)


class DownloadFailed(Exception):
    """At least one of the parallel downloads failed."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        failed = [r for r in results if not r["ok"]]
        super().__init__(f"{len(failed)} of {len(results)} downloads failed: {failed[0]['error']}")
        self.results = results
        self.status = failed[0]["status"]


def run(args: argparse.Namespace) -> Any:
    """Carry out the operation; return its result."""
    if args.op == "download":
        results = download_many(args)
        if not all(r["ok"] for r in results):
            raise DownloadFailed(results)
        return results
    client = CLIENTS[args.client](args)
    if args.op == "create":
        return client.create(args.name, args.visibility)
    if args.op == "upload":
        return client.upload(args.image_id, args.file)
    if args.op == "list":
        return client.list()
    if args.op == "show":
        return client.show(args.image_id)
    if args.op == "share":
        return client.share(args.image_id, args.project_id)
    return client.accept(args.image_id, args.project_id)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print the JSON report; return the exit code."""
    args = parse(argv)
    report: dict[str, Any] = {"ok": True, "result": None, "error": "", "status": None}
    try:
        report["result"] = run(args)
    except DownloadFailed as exc:
        report.update(ok=False, result=exc.results, error=str(exc), status=exc.status)
    except Exception as exc:  # the client's own error is what the test looks at
        report.update(ok=False, error=f"{type(exc).__name__}: {exc}", status=status_of(exc))
    report["http"] = HTTP_LOG
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
