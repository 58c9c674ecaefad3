"""The one exception nanovl raises for bad input, so the CLI can print it as one line; Ctrl-C while a command starts."""
import contextlib
import os
import signal
import threading


class NanovlError(ValueError):
    """Bad input (a missing file, an unsupported checkpoint, a prompt that does not fit): the message says what and how to fix it."""


@contextlib.contextmanager
def ctrl_c_exits(active: bool = True):
    """Ctrl-C while a command imports torch (a second or more): leave at once with status 130, as a command does
    when interrupted. A KeyboardInterrupt raised inside torch's or numpy's own import can be swallowed there (the
    command then goes on as if no key was pressed), turn into an ImportError, or abort the process from C++
    (pybind11's terminate); nothing has been done yet that leaving at once would lose. A SIGINT that is ignored
    (a background job) stays ignored; only the main thread can set a handler."""
    active = (active and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if active:
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    try:
        yield
    finally:
        if active:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on: KeyboardInterrupt, main() -> 130
