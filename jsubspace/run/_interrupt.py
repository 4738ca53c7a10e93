"""SIGINT and SIGTERM stop a run within seconds, wherever it is, leaving no torn file.

Python runs signal handlers only between bytecodes of the main thread, so a run inside a long XLA
solve (minutes on a wide layer) would not notice Ctrl-C until the solve returns. The C-level
handler still writes the signal number to the wakeup fd (`signal.set_wakeup_fd`) at once, from
whatever thread received it. A watchdog thread waits on that fd: the main thread gets `grace`
seconds to stop by itself (its Python handler raises `Interrupted` as soon as it runs Python
code); if it is still busy, the watchdog waits for any atomic write in flight to finish
(`io.WRITE_LOCK`), prints what was kept and ends the process. Finished layers are whole files
(written atomically), so a rerun resumes from them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading

from jsubspace.errors import Interrupted
from jsubspace.io._atomic import WRITE_LOCK

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _watch(reader: socket.socket, done: threading.Event, grace: float, message) -> None:
    try:
        data = reader.recv(1)
    except OSError:
        return
    if not data or done.is_set():
        return
    signum = data[0]
    if done.wait(grace):
        return  # the main thread stopped by itself
    # Never end the process in the middle of an atomic write.
    WRITE_LOCK.acquire(timeout=30)
    # A live progress line hid the cursor; no exit handler will show it again.
    show = "\x1b[?25h" if sys.stderr.isatty() else ""
    print(f"{show}\njsubspace: interrupted; {message()}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODES.get(signum, 130))


@contextlib.contextmanager
def interruptible(*, grace: float = 2.0, message=lambda: "nothing was written"):
    """Within this context, SIGINT / SIGTERM raise `Interrupted` in the main thread, and end the
    process `grace` seconds later if the main thread is stuck in native code.

    `message()` says what was kept (called when the process has to be ended from the watchdog).
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    done = threading.Event()

    def handler(signum, frame):
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name}; {message()}",
            exit_code=EXIT_CODES.get(signum, 130),
        )

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watchdog = threading.Thread(
        target=_watch, args=(reader, done, grace, message), name="jsubspace-interrupt", daemon=True
    )
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        writer.close()  # wakes the watchdog with an empty read
        watchdog.join(timeout=1)
        reader.close()
