"""Download one image with python-glanceclient v2, the way Nova does.

Run it with the GLANCE venv's python (tests/glance/setup-venv.sh):

    download.py ENDPOINT IMAGE_ID OUT_FILE [--token T]

glanceclient verifies os_hash_value (else checksum, else Content-MD5) itself and raises
IOError("Corrupt image download ...") after the last chunk on a mismatch. Exit 0 and print a
one-line JSON summary ({"bytes": N, "sha256": HEX}) on success; on any exception print it to
stderr, remove OUT_FILE and exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys


def download(
    endpoint: str, image_id: str, out: pathlib.Path, token: str | None
) -> dict[str, object]:
    """Write the image's bytes to out through glanceclient; return its size and sha256."""
    import glanceclient  # only in the Glance venv

    client = glanceclient.Client("2", endpoint=endpoint, token=token)
    body = client.images.data(image_id)
    if body is None:
        raise RuntimeError(f"image {image_id} has no data")
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as fh:
        for chunk in body:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, download, print the summary; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint")
    parser.add_argument("image_id")
    parser.add_argument("out_file", type=pathlib.Path)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    try:
        summary = download(args.endpoint, args.image_id, args.out_file, args.token)
    except Exception as exc:  # report whatever glanceclient raised, and fail
        args.out_file.unlink(missing_ok=True)
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
