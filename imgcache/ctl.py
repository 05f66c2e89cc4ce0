"""The management commands of the ``imgcache`` CLI: a small client of the server's
management API on its unix socket (standard library only, so it starts fast; tqdm is
loaded only to draw a progress bar on a terminal)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from imgcache.config import format_size, load_settings
from imgcache.errors import ConfigError
from imgcache.progress import Progress

#: Seconds between two looks at a running prefetch or verification.
_POLL = 0.5
#: States in which a prefetch job is over.
_ENDED = ("cached", "failed", "withdrawn")


class NotRunning(Exception):
    """No server answers on the management socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


class AdminClient:
    """Calls the management API of the server listening on ``path``."""

    def __init__(self, path: Path, timeout: float = 3600) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON answer. Raises NotRunning, or
        RuntimeError with the server's message for an error status."""
        connection = _UnixConnection(self.path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            connection.request(method, url, body=payload, headers=headers)
            response = connection.getresponse()
            answer = json.loads(response.read() or b"{}")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(f"imgcache is not running: nothing answers on {self.path} "
                             "(start it with `imgcache serve`, or point --socket / "
                             "--config at the right one)") from exc
        except PermissionError as exc:
            raise NotRunning(f"not allowed to use {self.path}: run as root, as imgcache's "
                             "user, or as a member of its [admin] socket_group") from exc
        finally:
            connection.close()
        if response.status >= 400:
            raise RuntimeError(answer.get("error", f"the server answered {response.status}"))
        return answer


def add_command(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    """Add one sub-command that talks to the server over its management socket, with the
    options every such command takes (--socket, --config, --json)."""
    parser = commands.add_parser(name, help=text, description=text)
    parser.add_argument("--socket", type=Path, help="management socket (default: from "
                        "--config, IMGCACHE_ADMIN_SOCKET, or /run/imgcache/imgcache.sock)")
    parser.add_argument("--config", type=Path, help="the server's INI config file")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def add_commands(commands: Any) -> None:
    """Add the management sub-commands to the CLI's sub-parser set."""
    def command(name: str, text: str) -> argparse.ArgumentParser:
        return add_command(commands, name, text)

    command("list", "list cached images")
    for name, text in (("prefetch", "queue images to download into the cache"),
                       ("pin", "keep images cached, never evicted (prefetching them first "
                               "if needed)")):
        parser = command(name, text)
        parser.add_argument("image_ids", nargs="+", metavar="ID")
        parser.add_argument("--token", help="Keystone token Glance authorizes the download "
                                            "with (default: $OS_AUTH_TOKEN)")
        parser.add_argument("--wait", action="store_true",
                            help="wait until every image is cached or failed")
    command("queue", "show queued prefetches and downloads in flight")
    command("unpin", "let images be evicted again").add_argument(
        "image_ids", nargs="+", metavar="ID")
    command("evict", "remove images from the cache").add_argument(
        "image_ids", nargs="+", metavar="ID")
    command("clear", "evict every unpinned image").add_argument(
        "--pinned", action="store_true", help="evict pinned images too")
    command("verify", "re-hash cached images, evicting corrupt ones").add_argument(
        "image_ids", nargs="*", metavar="ID", help="default: every cached image")
    command("stats", "cache size, entries, hit ratio and bytes saved since start")


COMMANDS = ("list", "prefetch", "pin", "queue", "unpin", "evict", "clear", "verify", "stats")


def run_command(args: argparse.Namespace) -> int:
    """Run one management command; print its answer; return the exit status."""
    try:
        path = args.socket or load_settings(config_file=args.config).admin_socket
    except ConfigError as exc:
        print(f"imgcache: configuration error: {exc}", file=sys.stderr)
        return 2
    client = AdminClient(path)
    try:
        answer = _COMMANDS[args.command](client, args)
    except NotRunning as exc:
        print(f"imgcache: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"imgcache {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(_HUMAN[args.command](answer))
    return 1 if _failed(answer) else 0


def _failed(answer: Any) -> bool:
    jobs = answer.get("jobs", []) if isinstance(answer, dict) else []
    results = answer.get("results", {}) if isinstance(answer, dict) else {}
    return any(job["state"] != "cached" for job in jobs if job["state"] in _ENDED) or any(
        r != "ok" for r in results.values())


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("OS_AUTH_TOKEN", "")
    if not token:
        raise RuntimeError("a token is needed: --token or OS_AUTH_TOKEN (Glance authorizes "
                           "prefetches like any download)")
    return token


def _prefetch(client: AdminClient, args: argparse.Namespace, pin: bool = False) -> Any:
    answer = client.call("POST", "/v1/prefetch",
                         {"image_ids": args.image_ids, "token": _token(args), "pin": pin})
    if not args.wait:
        return answer
    wanted = {job["job_id"] for job in answer["jobs"]}
    progress = Progress("pin" if pin else "prefetch")
    try:
        while True:
            jobs = [j for j in client.call("GET", "/v1/queue")["jobs"]
                    if j["job_id"] in wanted]
            ended = [j for j in jobs if j["state"] in _ENDED]
            progress.update(sum(j["size"] if j["state"] == "cached" else j["written"]
                                for j in jobs), sum(j["size"] for j in jobs),
                            f"{len(ended)} of {len(jobs)} images done")
            if len(ended) == len(jobs):
                return {"jobs": jobs}
            time.sleep(_POLL)
    finally:
        progress.close()


def _verify(client: AdminClient, args: argparse.Namespace) -> Any:
    run = client.call("POST", "/v1/verify", {"image_ids": args.image_ids})["run"]
    progress = Progress("verify")
    try:
        while True:
            checked = sum(r != "not cached" for r in run["results"].values())
            progress.update(run["done_bytes"], run["total_bytes"], f"{checked} images checked")
            if run["state"] == "done":
                return {"results": run["results"]}
            time.sleep(_POLL)
            run = client.call("GET", f"/v1/verify/{run['run_id']}")["run"]
    finally:
        progress.close()


def _pin(client: AdminClient, args: argparse.Namespace) -> Any:
    cached = {e["image_id"] for e in client.call("GET", "/v1/entries")["entries"]}
    pinned = [client.call("POST", f"/v1/pin/{i}")["pinned"] for i in args.image_ids
              if i in cached]
    missing = [i for i in args.image_ids if i not in cached]
    answer: dict[str, Any] = {"pinned": pinned}
    if missing:
        args.image_ids = missing
        answer["jobs"] = _prefetch(client, args, pin=True)["jobs"]
    return answer


_COMMANDS = {
    "list": lambda c, a: c.call("GET", "/v1/entries"),
    "prefetch": _prefetch,
    "pin": _pin,
    "queue": lambda c, a: c.call("GET", "/v1/queue"),
    "unpin": lambda c, a: {"unpinned": [c.call("POST", f"/v1/unpin/{i}")["unpinned"]
                                        for i in a.image_ids]},
    "evict": lambda c, a: {"evicted": [c.call("DELETE", f"/v1/entries/{i}")["evicted"]
                                       for i in a.image_ids]},
    "clear": lambda c, a: c.call("DELETE", "/v1/entries" + ("?pinned=1" if a.pinned else "")),
    "verify": _verify,
    "stats": lambda c, a: c.call("GET", "/v1/stats"),
}


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))
                     for row in [header, *rows]).rstrip()


def _jobs(answer: dict[str, Any]) -> str:
    return _table([[j["image_id"], j["state"], "yes" if j["pin"] else "no",
                    f"{format_size(j['written'])} / {format_size(j['size'])}", j["error"]]
                   for j in answer.get("jobs", [])],
                  ["ID", "STATE", "PIN", "PROGRESS", "ERROR"])


_HUMAN = {
    "list": lambda a: _table(
        [[e["image_id"], format_size(e["size"]), _when(e["last_access"]), str(e["hits"]),
          "yes" if e["pinned"] else "no", _when(e["verified_at"])] for e in a["entries"]],
        ["ID", "SIZE", "LAST ACCESS", "HITS", "PINNED", "LAST VERIFIED"]),
    "prefetch": _jobs,
    "pin": lambda a: "\n".join([*(f"pinned {e['image_id']}" for e in a["pinned"]),
                                *([_jobs(a)] if a.get("jobs") else [])]),
    "queue": lambda a: "downloads in flight:\n" + _table(
        [[f["image_id"], f"{format_size(f['written'])} / {format_size(f['size'])}",
          "verified" if f["verified"] else "downloading"] for f in a["fills"]],
        ["ID", "PROGRESS", "STATE"]) + "\n\nprefetches:\n" + _jobs(a),
    "unpin": lambda a: "\n".join(f"unpinned {e['image_id']}" for e in a["unpinned"]),
    "evict": lambda a: "\n".join(f"evicted {i}" for i in a["evicted"]),
    "clear": lambda a: f"evicted {a['removed']} images; {a['kept_pinned']} pinned kept",
    "verify": lambda a: "\n".join(f"{i}  {r}" for i, r in a["results"].items())
    or "nothing cached",
    "stats": lambda a: "\n".join([
        f"cache:       {format_size(a['cache_bytes'])} of {format_size(a['max_bytes'])} "
        f"({format_size(a['pinned_bytes'])} pinned), {a['entries']} images"
        + (f"; {format_size(a['over_cap_bytes'])} OVER THE CAP that cannot be evicted (unpin "
           "images or raise [cache] max_size)" if a.get("over_cap_bytes") else ""),
        f"in flight:   {a['fills_in_progress']} downloads",
        "requests:    " + ", ".join(f"{k} {v:.0f}" for k, v in a["requests"].items()),
        "hit ratio:   " + ("-" if a["hit_ratio"] is None else f"{a['hit_ratio']:.1%}"),
        f"bytes saved: {format_size(a['bytes_saved'])} ({format_size(a['bytes_served'])} served, "
        f"{format_size(a['bytes_from_glance'])} from Glance)",
    ]),
}
