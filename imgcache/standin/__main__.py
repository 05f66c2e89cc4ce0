"""Running the stand-in by hand: ``python -m imgcache.standin --data-dir DIR ...``.

Starts a stand-in with generated images, prints one JSON line (its URL, image ids, sizes and
tokens) and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import signal
import ssl

from imgcache.config import parse_size
from imgcache.standin.faults import Fault
from imgcache.standin.server import GlanceStandin


def _size(text: str) -> int:
    """Parse ``--image-size`` like imgcache's own size options (``64M``, ``2G``)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} ({exc})") from None


async def _serve(args: argparse.Namespace) -> None:
    """Start a stand-in with generated images, print them as JSON, serve until a signal."""
    tls = None
    if args.cert_file:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert_file, args.key_file)
    standin = GlanceStandin(
        args.data_dir, host=args.host, port=args.port, tokens=args.token or ["token-a"],
        ssl_context=tls,
    )
    await standin.start()
    try:
        images = [await standin.add_image(size=size, visibility=args.visibility)
                  for size in args.sizes]
        for image in images:
            if args.rate:
                standin.faults[image.id] = Fault(rate=args.rate)
        line = {
            "url": standin.url,
            "image_id": images[0].id,
            "image_ids": [image.id for image in images],
            "size": images[0].size,
            "tokens": sorted(standin.tokens),
        }
        print(json.dumps(line), flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
    finally:
        await standin.stop()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m imgcache.standin``."""
    parser = argparse.ArgumentParser(
        prog="python -m imgcache.standin", description="Run a Glance v2 stand-in."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9292)
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--image-size", type=_size, default=_size("64M"))
    parser.add_argument("--images", type=int, default=1, help="how many images (1)")
    parser.add_argument("--image-sizes", type=pathlib.Path, metavar="FILE",
                        help="one image per size listed in FILE (whitespace-separated, "
                             "e.g. 200K 3M); instead of --images and --image-size")
    parser.add_argument("--rate", type=_size, default=0,
                        help="trickle every download to this many bytes/s (default: full speed)")
    parser.add_argument("--visibility", default="private")
    parser.add_argument(
        "--token", action="append", help="a valid token (repeatable; default token-a)"
    )
    parser.add_argument("--cert-file", type=pathlib.Path,
                        help="serve https with this PEM certificate (and --key-file)")
    parser.add_argument("--key-file", type=pathlib.Path, help="the certificate's PEM key")
    args = parser.parse_args(argv)
    args.sizes = ([_size(word) for word in args.image_sizes.read_text().split()]
                  if args.image_sizes else [args.image_size] * args.images)
    if args.key_file and not args.cert_file:
        parser.error("--key-file needs --cert-file")
    import uvloop  # here, so importing the module for tests does not need it

    uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
