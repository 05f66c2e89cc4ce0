"""Run a command under the seccomp rules a systemd unit asks for, without systemd running.

    python tests/sandbox.py systemd/imgcache.service -- imgcache serve ...

Applies, as systemd's own seccomp code does (src/shared/seccomp-util.c), the unit's
``MemoryDenyWriteExecute=yes`` (mmap writable and executable, mprotect/pkey_mprotect adding
executable, shmat with SHM_EXEC: EPERM), ``RestrictAddressFamilies=`` (socket() of another
family: EAFNOSUPPORT) and ``SystemCallFilter=`` (an allow list of syscalls and @groups,
expanded by ``systemd-analyze syscall-filter``; anything else fails with
``SystemCallErrorNumber=``), then execs the command. The filters are inherited by every
thread and child, so the tests can prove the hardened unit does not break the server.
Only allow lists are supported (a ``~`` deny list is refused).
"""

from __future__ import annotations

import configparser
import ctypes
import errno
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_MAX = 46


def scmp_act_errno(number: int) -> int:
    """libseccomp's SCMP_ACT_ERRNO(number)."""
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64))


@functools.cache
def libseccomp() -> ctypes.CDLL:
    """libseccomp (Debian's libseccomp2, which systemd itself depends on)."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp))
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    return lib


class Filter:
    """One libseccomp filter context (its default action applies to unmatched calls)."""

    def __init__(self, default_action: int) -> None:
        self.lib = libseccomp()
        self.ctx = self.lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        """Add a rule; False when this architecture has no such syscall."""
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return False
        array = (ArgCmp * max(len(cmps), 1))(*(ArgCmp(*c) for c in cmps))
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add_array({name}): {os.strerror(-rc)}")
        return True

    def load(self) -> None:
        """Install the filter in this process (and so in everything it execs)."""
        rc = self.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def service_section(unit: Path) -> dict[str, str]:
    """The unit's [Service] settings (the last assignment of a key wins)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return dict(parser["Service"])


def expand_syscalls(spec: str) -> set[str]:
    """Syscall names of a SystemCallFilter= allow list, @groups expanded recursively."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                             text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    names: set[str] = set()

    def add(item: str) -> None:
        if item.startswith("@"):
            for member in groups[item]:
                add(member)
        else:
            names.add(item)

    for item in spec.split():
        add(item)
    return names


def memory_deny_write_execute() -> Filter:
    """systemd's MemoryDenyWriteExecute=yes rules."""
    f = Filter(SCMP_ACT_ALLOW)
    deny = scmp_act_errno(errno.EPERM)
    wx = PROT_WRITE | PROT_EXEC
    f.rule(deny, "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
    for name in ("mprotect", "pkey_mprotect"):
        f.rule(deny, name, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.rule(deny, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    return f


def restrict_address_families(spec: str) -> Filter:
    """RestrictAddressFamilies= as an allow list: other socket() families fail."""
    allowed = {int(getattr(socket, name)) for name in spec.split()}
    f = Filter(SCMP_ACT_ALLOW)
    deny = scmp_act_errno(errno.EAFNOSUPPORT)
    for family in range(AF_MAX + 1):
        if family not in allowed:
            f.rule(deny, "socket", (0, SCMP_CMP_EQ, family, 0))
    f.rule(deny, "socket", (0, SCMP_CMP_GT, AF_MAX, 0))
    return f


def system_call_filter(spec: str, error_name: str) -> Filter:
    """SystemCallFilter= allow list; other syscalls fail with SystemCallErrorNumber=."""
    if spec.startswith("~"):
        raise ValueError("only allow lists are supported")
    f = Filter(scmp_act_errno(getattr(errno, error_name)))
    for name in sorted(expand_syscalls(spec)):
        f.rule(SCMP_ACT_ALLOW, name)
    return f


def filters_of(unit: Path) -> list[Filter]:
    """The seccomp filters the unit's [Service] settings ask for."""
    service = service_section(unit)
    filters = []
    if service.get("MemoryDenyWriteExecute") == "yes":
        filters.append(memory_deny_write_execute())
    if service.get("RestrictAddressFamilies"):
        filters.append(restrict_address_families(service["RestrictAddressFamilies"]))
    if service.get("SystemCallFilter"):
        filters.append(system_call_filter(service["SystemCallFilter"],
                                          service.get("SystemCallErrorNumber", "EPERM")))
    return filters


def main(argv: list[str]) -> None:
    """``sandbox.py UNIT -- COMMAND...``: exec COMMAND under UNIT's seccomp rules."""
    unit, dashes, *command = argv
    if dashes != "--" or not command:
        raise SystemExit("usage: sandbox.py UNIT -- COMMAND [ARG...]")
    filters = filters_of(Path(unit))
    for f in filters:
        f.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
