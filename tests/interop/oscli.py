"""The real command-line clients of the OpenStack venv, as an operator types them: ``glance``
(python-glanceclient) and ``openstack`` (python-openstackclient over openstacksdk).

Every run is recorded (command without secrets, exit status, output, seconds) so that a test
can print what each command answered."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from openstack_venv import clean_env
from stack import DOMAIN, REGION, Stack, User


@dataclass(frozen=True)
class CliRun:
    """One finished command."""

    shown: str  # the command line, tokens and passwords left out
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def report(self) -> str:
        """The run as the test log shows it."""
        out = (self.stdout.strip() + "\n" + self.stderr.strip()).strip()
        return f"$ {self.shown}  -> exit {self.returncode} in {self.seconds:.1f} s\n{out}"


class Cli:
    """Runs ``glance`` with a token against an image URL, and ``openstack`` with a password
    and its image endpoint overridden, both pointed at one imgcache."""

    def __init__(self, stack: Stack, image_url: str) -> None:
        self.stack = stack
        self.image_url = image_url
        self.runs: list[CliRun] = []

    def glance(self, user: User, *args: str, token: str | None = None) -> CliRun:
        """``glance --os-image-url URL --os-auth-token TOKEN ARGS...``."""
        token = token or self.stack.token(user)
        return self._run(["glance", "--os-image-url", self.image_url, "--os-auth-token",
                          token, *args], shown=f"glance --os-image-url {self.image_url} "
                          f"(token of {user.name}) {' '.join(args)}", env={})

    def openstack(self, user: User, *args: str) -> CliRun:
        """``openstack ARGS...`` authenticated as ``user`` by password, with
        ``OS_IMAGE_ENDPOINT_OVERRIDE`` pointing at imgcache."""
        env = {
            "OS_AUTH_URL": f"{self.stack.keystone.url}/v3", "OS_USERNAME": user.name,
            "OS_PASSWORD": user.password, "OS_PROJECT_NAME": user.project,
            "OS_USER_DOMAIN_NAME": DOMAIN, "OS_PROJECT_DOMAIN_NAME": DOMAIN,
            "OS_REGION_NAME": REGION, "OS_IDENTITY_API_VERSION": "3",
            "OS_IMAGE_ENDPOINT_OVERRIDE": self.image_url,
        }
        return self._run(["openstack", *args], env=env,
                         shown=f"OS_IMAGE_ENDPOINT_OVERRIDE={self.image_url} openstack "
                               f"(as {user.name}) {' '.join(args)}")

    def _run(self, cmd: list[str], shown: str, env: dict[str, str]) -> CliRun:
        began = time.monotonic()
        done = subprocess.run(
            [str(self.stack.venv / "bin" / cmd[0]), *cmd[1:]],
            env=clean_env(self.stack.venv, **env), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=180, check=False)
        run = CliRun(shown, done.returncode, done.stdout, done.stderr,
                     time.monotonic() - began)
        self.runs.append(run)
        return run

    def report(self) -> str:
        """Every run so far, for the test's output."""
        return "\n\n".join(run.report() for run in self.runs)
