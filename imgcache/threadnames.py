"""The names the OS shows for imgcache's threads (``top -H``, ``ps -L``, ``pidstat -t``,
``/proc/PID/task/TID/comm``), one per role, so that an operator can tell which of them
spends the CPU. The event loop keeps the process's name, and so do a few threads that are
idle but for short errands (asyncio's default executor, the pipeline pool's starter);
libuv names its own workers ``libuv-worker``.

Python 3.11 names its threads for itself only; Linux takes a thread's name from the thread
itself, through ``/proc/thread-self/comm`` (at most 15 bytes).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

#: Threads that send image bytes to clients (``loopthreads``, ``responses``).
SENDING = "imgcache-send"
#: Threads of the download pipeline (``sink``): before their first download, and once they
#: write a download's bytes to its cache file, or hash them (sha512 is a fill's critical
#: path); a thread keeps the name of the last of these roles it took.
PIPELINE = "imgcache-pipe"
WRITING = "imgcache-write"
HASHING = "imgcache-hash"
#: File opens, creates, deletes and commits; the index; the access history; verification.
FILES = "imgcache-files"
INDEX = "imgcache-index"
HISTORY = "imgcache-hist"
VERIFY = "imgcache-verify"
#: Formats log records and writes them to stderr (``logwriter``).
LOGGING = "imgcache-log"


def show_thread_name(name: str) -> None:
    """Show ``name`` (at most 15 bytes) as the calling thread's name; nothing where the OS
    does not let a thread name itself."""
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as comm:
        comm.write(name)


def named_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor of at most ``workers`` threads, each named ``name`` for the OS
    (and ``name``_N for Python)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=show_thread_name,
                              initargs=(name,))
