"""kill -9 of a real imgcache process at random moments during fills, each followed by a
restart on the same cache directory: no partial or corrupt entry is ever served, leftovers
are swept, committed entries survive."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from processes import ImgcacheProcess, StandinProcess

MiB = 1 << 20
TOKEN = "token-a"
KILLS = 20


def image_hashes(standin: StandinProcess, image_id: str) -> str:
    request = urllib.request.Request(f"{standin.url}/v2/images/{image_id}",
                                     headers={"X-Auth-Token": TOKEN})
    with urllib.request.urlopen(request) as response:
        return json.load(response)["os_hash_value"]


def download(server: ImgcacheProcess, image_id: str, headers_file: Path) -> tuple[str, str]:
    """(X-Cache-Status, sha512 of the body) of a curl download through imgcache."""
    done = subprocess.run(
        f"set -o pipefail; curl -sS -f -D {headers_file} -H 'X-Auth-Token: {TOKEN}' "
        f"{server.url}/v2/images/{image_id}/file | sha512sum",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    headers = headers_file.read_text() if headers_file.exists() else ""
    assert done.returncode == 0, (done.stderr, headers)
    status = [line.split(":", 1)[1].strip() for line in headers.splitlines()
              if line.lower().startswith("x-cache-status:")]
    assert len(status) == 1, headers
    return status[0], done.stdout.split()[0]


def test_kill_9_at_random_moments_never_serves_a_partial_entry(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CRASH_SEED", "1234")))
    # 24 MiB images trickled at 16 MiB/s: each fill takes about 1.5 s.
    standin = StandinProcess(tmp_path / "glance", "24M", images=KILLS, rate="16M")
    cache = tmp_path / "cache"
    outcomes = {"killed_mid_fill": 0, "killed_after_commit": 0}
    try:
        for image_id in standin.image_ids:
            expected = image_hashes(standin, image_id)
            server = ImgcacheProcess(standin.url, cache)
            client = subprocess.Popen(
                ["curl", "-sS", "-o", "/dev/null", "-H", f"X-Auth-Token: {TOKEN}",
                 f"{server.url}/v2/images/{image_id}/file"], stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 2.0))
            os.kill(server.pid, signal.SIGKILL)
            log = server.stop()
            client.wait(30)
            committed = f"cached image {image_id}" in log
            outcomes["killed_after_commit" if committed else "killed_mid_fill"] += 1

            server = ImgcacheProcess(standin.url, cache)
            try:
                assert list((cache / "partial").iterdir()) == [], "partial files survived"
                status, digest = download(server, image_id, tmp_path / "headers")
                assert digest == expected, f"corrupt image served ({status})"
                if committed:
                    assert status == "HIT", "a committed entry did not survive kill -9"
                else:  # killed before the commit was logged: at most just committed
                    assert status in ("MISS", "HIT")
            finally:
                server.stop()
    finally:
        standin.stop()
    print(f"kill -9 outcomes over {KILLS} runs: {outcomes}")
    assert sum(outcomes.values()) == KILLS
