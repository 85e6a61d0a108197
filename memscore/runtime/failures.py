"""Why a run stopped, in one line: a failed Ray task's root cause, SIGTERM, a lost local Ray.

A run that stops says why on one line of stderr, with what to do next; Ray's tracebacks go to
its log files (``--debug`` puts them back on the terminal).

- ``run_stopped``, ``describe``: an exception raised in a Ray task reaches the driver wrapped,
  as ``RayTaskError(OSError)`` whose text is the remote traceback in ANSI colours, and often
  without the original object (exceptions travel pickled, without ``__cause__``, and Ray Data
  wraps a task's own exception in ``UserCodeException``). It is named by its innermost
  exception (``innermost``): the object where it survived, else the traceback's text.
- ``command_line``: what ``memscore.cli.guarded`` sets up around one command. SIGTERM stops it
  as Ctrl-C does (``Terminated``); Ray Data's logged tracebacks of the failure that ends a run
  stay off the terminal; a local Ray that loses its GCS or raylet ends the command at once,
  with one line. With a ``verbosity`` (the ``--verbose``/``--quiet`` of the commands that start
  Ray), Ray's own lines go to a log file unless ``--verbose`` (``ray_starting``).
- ``ray_starting``, ``ray_started``: what ``memscore.stages.pipeline`` calls right before and right
  after ``ray.init``, which takes SIGTERM over (measured on Ray 2.60: a Python handler that
  calls ``sys.exit(15)``, and below it the core worker's absl failure-signal handler, which
  prints ``*** SIGTERM received ...`` and a C++ stack before handing on).
"""

from __future__ import annotations

import contextlib
import errno as errnos
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from memscore.errors import first_line, strip_ansi
from memscore.stages.error_fraction import ErrorFractionExceeded
from memscore.stages.fetch import StorageConfigError, TransientFailure

__all__ = [
    "STOPPED",
    "WATCH_INTERVAL_S",
    "QUIET",
    "NORMAL",
    "VERBOSE",
    "Cause",
    "Terminated",
    "innermost",
    "describe",
    "run_stopped",
    "command_line",
    "ray_starting",
    "ray_started",
    "ray_log_path",
]

#: Exceptions a task raises on purpose to stop the run, each with a message written to be the
#: run's one line. Found in the driver's exception chain as objects or, where Ray has lost the
#: object, by their ``module.Class: message`` line in the remote traceback's text.
STOPPED: tuple[type[BaseException], ...] = (
    TransientFailure,
    ErrorFractionExceeded,
    StorageConfigError,  # an S3 client no request can succeed with: stopped at once
)

_RESUME = "run the same command with --resume (committed rows are kept)"

#: What to do after each of ``STOPPED``; a class not named here: fix it and --resume.
_AFTER = {
    ErrorFractionExceeded: "fix the cause and score again (--overwrite), or raise "
    "--max-error-fraction (1 turns the check off) and --resume",
    StorageConfigError: "fix the storage options (--storage-option or the AWS_* variables) and "
    "run the same command with --resume (committed rows are kept)",
}

#: Errors of a storage that refuses the run's writes, with what frees the way for --resume.
_STORAGE_ERRNOS = {
    errnos.ENOSPC: "free space",
    errnos.EDQUOT: "free space or raise the quota",
    errnos.EROFS: "make it writable",
    errnos.EACCES: "fix its permissions",
    errnos.EPERM: "fix its permissions",
}
_ONLY_WRITES_FAIL_SO = {errnos.ENOSPC, errnos.EDQUOT, errnos.EROFS}


@dataclass(frozen=True)
class Cause:
    """The innermost exception of a failure, as far as the driver can know it.

    ``kind`` is the class as a traceback names it (``OSError``,
    ``memscore.stages.fetch.TransientFailure``); ``message`` its first line without ANSI escapes;
    ``errno`` and ``filename`` an ``OSError``'s; ``task`` the Ray task it was raised in
    (``Write``, ``ReadParquet->MapBatches(decode_batch)``), None outside Ray.
    """

    kind: str
    message: str
    errno: int | None = None
    filename: str | None = None
    task: str | None = None

    def line(self) -> str:
        name = self.kind.rsplit(".", 1)[-1]
        return f"{name}: {self.message}" if self.message else name


def innermost(exc: BaseException) -> Cause:
    """The innermost exception of ``exc``, following Ray's wrappers and explicit causes.

    A ``RayTaskError`` leads to the exception its task raised (``cause``), anything else to its
    ``__cause__`` (not ``__context__``: an exception raised while handling another is the
    failure, the other its circumstance). Where the chain ends in one of Ray's own wrappers
    (``UserCodeException``: the task's exception lives on only as text), the innermost
    exception of the remote traceback's text is the cause.

    Example:
        >>> try:
        ...     try:
        ...         open("/nonexistent/x")
        ...     except OSError as exc:
        ...         raise RuntimeError("reading the manifest failed") from exc
        ... except RuntimeError as exc:
        ...     cause = innermost(exc)
        >>> cause.line(), cause.errno, cause.filename
        ("FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/x'", 2, '/nonexistent/x')
    """
    task_error = _ray_task_error()
    current, text, task, seen = exc, None, None, [exc]
    while True:
        if task_error is not None and isinstance(current, task_error):
            # Its text is the remote traceback (also where Ray turned it into a subclass of
            # the task's exception class, which keeps only ``cause`` and that text).
            text = str(current)
            task = _task_name(text)
            following = current.cause
        else:
            following = current.__cause__
        if (
            not isinstance(following, BaseException)
            or any(following is s for s in seen)
            or len(seen) > 50
        ):
            break
        seen.append(following)
        current = following
    if text is not None and type(current).__module__.partition(".")[0] == "ray":
        parsed = _innermost_in_text(text)
        if parsed is not None:
            return _cause_from_text(*parsed, task=task)
    return _cause_from_object(current, task)


def describe(exc: BaseException) -> str:
    """One line naming ``exc`` by its innermost exception (``innermost``), at most 500
    characters: what ``memscore.cli.guarded`` prints for an error it did not anticipate.

    Example:
        >>> describe(RuntimeError("\\x1b[36mray::Write()\\x1b[39m failed\\nTraceback ..."))
        'RuntimeError: ray::Write() failed'
    """
    return innermost(exc).line()[:500]


def run_stopped(exc: BaseException, *, output: str | None = None) -> str | None:
    """The one line for a run that stopped for a reason the user can act on, with what to do
    next; None for anything else.

    Reasons: one of ``STOPPED`` anywhere in the chain (a decode task that gave up on
    transient failures, ``--max-error-fraction``), or an innermost ``OSError`` from a storage
    that refuses writes (no space, quota, read-only, permission). ``output``: the run's
    ``--output``, named where the error names no file (pyarrow's write errors name none).

    Example:
        >>> import errno
        >>> run_stopped(OSError(errno.ENOSPC, "No space left on device", "/scores/part-1.parquet"))
        'No space left on device while writing /scores/part-1.parquet: free space and run the same command with --resume (committed rows are kept)'
        >>> run_stopped(ValueError("something else")) is None
        True
    """
    chain = _chain(exc)
    for current in chain:
        # the class itself, not Ray's subclass of it (whose str() is a whole traceback)
        if type(current) in STOPPED:
            return _stopped_line(type(current), first_line(current))
    by_name = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in STOPPED}
    names = "|".join(map(re.escape, by_name))
    pattern = re.compile(rf"^({names}): (.+)$", re.MULTILINE)
    for current in chain:
        match = pattern.search(strip_ansi(str(current)))
        if match:
            return _stopped_line(by_name[match.group(1)], match.group(2).strip())
    cause = innermost(exc)
    if cause.errno in _STORAGE_ERRNOS:
        return _storage_line(cause, output)
    return None


def _stopped_line(cls: type[BaseException], message: str) -> str:
    return f"{message}; {_AFTER.get(cls, 'fix it and ' + _RESUME)}"


def _storage_line(cause: Cause, output: str | None) -> str:
    what = os.strerror(cause.errno)
    in_write_task = "Write" in (cause.task or "")
    if cause.filename:
        writing = cause.errno in _ONLY_WRITES_FAIL_SO or in_write_task
        head = f"{what} while writing {cause.filename}" if writing else f"{what}: {cause.filename}"
    elif output and in_write_task:
        head = f"{what} while writing the output to {output}"  # pyarrow names no file
    elif cause.task:
        head = f"{what} in the Ray task {cause.task}"
    else:
        head = what
    return f"{head}: {_STORAGE_ERRNOS[cause.errno]} and {_RESUME}"


def _chain(exc: BaseException) -> list[BaseException]:
    """Every exception reachable from ``exc`` by ``cause``, ``__cause__`` and ``__context__``."""
    chain: list[BaseException] = []
    todo: list = [exc]
    while todo and len(chain) <= 50:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return chain


def _ray_task_error() -> type | None:
    """Ray's ``RayTaskError``, where Ray is imported (else no exception can be one)."""
    return getattr(sys.modules.get("ray.exceptions"), "RayTaskError", None)


_TASK_HEADER = re.compile(r"^ray::(?P<task>.+?)\(\) \(pid=", re.MULTILINE)


def _task_name(text: str) -> str | None:
    """``Write`` for a RayTaskError whose text starts ``ray::Write() (pid=...)``."""
    match = _TASK_HEADER.search(strip_ansi(text))
    return match.group("task") if match else None


_BY_CAUSE = "The above exception was the direct cause of the following exception:"
_BY_CONTEXT = "During handling of the above exception, another exception occurred:"
_EXCEPTION_LINE = re.compile(r"^(?P<kind>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?$")
_ERRNO_MESSAGE = re.compile(
    r"^\[Errno (?P<errno>\d+)\] (?P<strerror>.*?)"
    r"(?:: (?P<quote>['\"])(?P<filename>.*)(?P=quote))?$"
)


def _innermost_in_text(text: str) -> tuple[str, str] | None:
    """``(kind, first message line)`` of the innermost exception of a traceback's text.

    Python prints a chain root first: each exception's traceback, joined by a line saying
    whether the next was raised *from* it (its cause) or *while handling* it (not its cause).
    The last exception raised is the last section; its causes are the sections before it, as
    far back as the links say "direct cause"."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in strip_ansi(text).splitlines():
        if line.strip() in (_BY_CAUSE, _BY_CONTEXT):
            sections.append((line.strip(), []))
        else:
            sections[-1][1].append(line)
    found = [(link, _exception_line(lines)) for link, lines in sections]
    index = len(found) - 1
    while index >= 0 and found[index][1] is None:  # a trailing section without an exception
        index -= 1
    while index > 0 and found[index][0] == _BY_CAUSE and found[index - 1][1] is not None:
        index -= 1
    return found[index][1] if index >= 0 else None


def _exception_line(lines: list[str]) -> tuple[str, str] | None:
    """The exception line of one traceback: its first unindented line after the frames."""
    for line in lines:
        if not line.strip() or line[:1].isspace() or line.startswith(("Traceback ", "ray::")):
            continue
        match = _EXCEPTION_LINE.match(line.rstrip())
        return (match.group("kind"), match.group("message") or "") if match else None
    return None


def _cause_from_text(kind: str, message: str, *, task: str | None) -> Cause:
    match = _ERRNO_MESSAGE.match(message)
    if match is None:
        return Cause(kind, message, task=task)
    return Cause(
        kind, message, errno=int(match.group("errno")), filename=match.group("filename"), task=task
    )


def _cause_from_object(exc: BaseException, task: str | None) -> Cause:
    cls = type(exc)
    kind = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    number = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if not isinstance(number, int):
        return Cause(kind, first_line(exc) if str(exc).strip() else "", task=task)
    # Ray Data appends its retry note to a failed task's exception's args, which lands in an
    # OSError's filename slot: a file name has no line break, the note always has.
    filename = exc.filename if isinstance(exc.filename, str) and "\n" not in exc.filename else None
    message = f"[Errno {number}] {first_line(OSError(exc.strerror or ''))}"
    if filename:
        message += f": {filename!r}"
    return Cause(kind, message, errno=number, filename=filename, task=task)


# --------------------------------------------------------------------------- the command line
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises ``KeyboardInterrupt``.

    A ``KeyboardInterrupt`` so that a terminated command stops the way an interrupted one
    does: every ``except Exception`` lets it through, ``finally`` blocks run, and Ray Data
    shuts its executor down. Nothing is half-written by stopping at any point (bookkeeping
    files are written whole or not at all), and ``--resume`` finishes the run.
    """


#: How much of a command that starts Ray reaches the terminal (``memscore.cli``'s
#: ``--quiet`` and ``--verbose``; NORMAL without either): QUIET, memscore's final line, its
#: warnings and errors; NORMAL, those and Ray Data's progress bars on a terminal; VERBOSE, those
#: and every line Ray prints, its workers' output included, as Ray prints them.
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"


@dataclass
class _Command:
    resume_hint: str | None
    debug: bool
    verbosity: str | None = None  # None: a command without the options; Ray prints as it does
    terminating: bool = False
    ray_log: _RayLog | None = None


_command: _Command | None = None

#: How often the watchdog of a local Ray looks at its GCS and raylet processes (a ``waitpid``
#: each): the line comes at most this long after one is gone, plus the time to stop the node's
#: other processes, where Ray's own driver waits 60 s for the GCS and exits with 1.
WATCH_INTERVAL_S = 0.5


@contextlib.contextmanager
def command_line(*, resume_hint: str | None, debug: bool, verbosity: str | None = None):
    """Around one ``memscore`` command: SIGTERM raises ``Terminated`` in the main thread, and
    ``ray_starting``/``ray_started`` know they run for a command (``resume_hint``: what
    finishes the command after a stop, e.g. ``run the same command with --resume to finish
    it``; ``debug``: Ray Data's tracebacks stay on the terminal; ``verbosity``: QUIET, NORMAL
    or VERBOSE, None for a command that leaves Ray's output as it is). Everything is put back
    on the way out."""
    global _command
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    command = _command = _Command(resume_hint, debug, verbosity)
    try:
        yield
    finally:
        _command = None
        if command.ray_log is not None:
            command.ray_log.close()
        _show_ray_data_errors()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def ray_starting() -> bool:
    """Right before ``ray.init`` (``memscore.stages.pipeline``): whether Ray should forward its
    workers' output to this process (``ray.init``'s ``log_to_driver``).

    Outside ``command_line``, or for a command with VERBOSE or no verbosity: True, and nothing
    changes. Otherwise, for the rest of the command, Ray's lines go to a log file of the
    command's own (``ray_log_path``) instead of the terminal: the records of Ray's Python
    loggers (``ray``, ``ray.data``), and whatever is written to file descriptor 2 (the C++ core
    worker's ERROR lines, which Ray copies there unconditionally), while ``sys.stderr``, and so
    memscore's own lines and the progress bars, stays on the terminal. The workers' output is
    not forwarded (False): it stays in their files in Ray's session log folder."""
    command = _command
    if command is None or command.verbosity in (None, VERBOSE):
        return True
    if command.ray_log is None:
        command.ray_log = _RayLog(debug=command.debug)
    return False


def ray_started(*, local: bool) -> None:
    """Right after ``ray.init`` (``memscore.stages.pipeline``); nothing outside ``command_line``.

    Takes SIGTERM back from Ray (reinstalling the Python handler also replaces the absl
    handler that the core worker put beneath it), keeps Ray Data's logged tracebacks of the
    failure that ends a run off the terminal unless ``--debug``, with ``local`` (this
    process started the Ray) watches its GCS and raylet processes, and where ``ray_starting``
    took Ray's lines off the terminal, moves their log file into Ray's session log folder
    and says so on a terminal (NORMAL), and keeps Ray Data's progress bars off a terminal that
    is not one, or off every terminal (QUIET)."""
    command = _command
    if command is None:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if not command.debug:
        _hide_ray_data_errors()
    if command.ray_log is not None:
        command.ray_log.settle(command.verbosity)
    if local:
        _watch_local_ray(command)


def ray_log_path() -> str | None:
    """The file Ray's lines go to during the current command (``ray_starting``), else None."""
    command = _command
    return command.ray_log.path if command is not None and command.ray_log is not None else None


def _on_sigterm(signum, frame) -> None:
    command = _command
    if command is None or command.terminating:
        return  # already on its way out: a second SIGTERM does not cut the cleanup short
    command.terminating = True
    raise Terminated()


class _RunEndingErrors(logging.Filter):
    """Keeps Ray Data's ERROR records off the terminal; its log file still gets them.

    memscore sets ``max_errored_blocks`` to 0, so each such record is Ray Data logging the
    exception that is about to end the run (the whole remote traceback, twice for an error in
    its own code: 217 lines for a full disk, measured), which memscore then names in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_RAY_DATA_ERRORS = _RunEndingErrors()


def _terminal_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and not isinstance(h, _LogFileHandler)
    ]


def _hide_ray_data_errors() -> None:
    import ray.data  # noqa: F401  (configures Ray Data's loggers: their handlers exist from here)

    for handler in _terminal_handlers(logging.getLogger("ray.data")):
        handler.addFilter(_RAY_DATA_ERRORS)


def _show_ray_data_errors() -> None:
    if "ray.data" in sys.modules:
        for handler in logging.getLogger("ray.data").handlers:
            handler.removeFilter(_RAY_DATA_ERRORS)


class _OffTheTerminal(logging.Filter):
    """Keeps a Ray logger's terminal handler quiet (its records go to the command's log file
    instead), but for errors under ``--debug``, which has always shown Ray Data's tracebacks."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        return self.debug and record.levelno >= logging.ERROR


class _LogFileHandler(logging.StreamHandler):
    """The command's log file, as a handler of Ray's loggers (a class of its own, so that
    ``_terminal_handlers`` never takes it for one that writes to the terminal)."""


def _ray_loggers() -> list[logging.Logger]:
    """Ray's loggers that print for themselves: ``ray`` and those below it that do not hand
    their records on to it (``ray.data``), once Ray has configured them."""
    import ray.data  # noqa: F401  (configures the ``ray`` and ``ray.data`` loggers)

    found = [logging.getLogger("ray")]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            name.startswith("ray.")
            and isinstance(logger, logging.Logger)
            and logger.handlers
            and not logger.propagate
        ):
            found.append(logger)
    return found


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO, closed
        return False


class _RayLog:
    """Ray's lines of one command, off the terminal and in one file (``ray_starting``).

    The file starts in the temporary folder, since Ray's session folder is made by
    ``ray.init``, and moves into that session's log folder once there is one (``settle``);
    the open descriptor follows it. File descriptor 2 points at the file, so that what Ray's C++
    code writes there lands in it; ``sys.stderr`` is a copy of the terminal's descriptor, so
    that Python's own writes (memscore's lines, tracebacks, the progress bars) do not."""

    FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"

    def __init__(self, *, debug: bool):
        fd, self.path = tempfile.mkstemp(prefix=f"memscore-{os.getpid()}-", suffix=".log")
        os.close(fd)
        # O_APPEND: the C++ writes through descriptor 2 and the handler's never overwrite
        # each other
        self.file = open(
            os.open(self.path, os.O_WRONLY | os.O_APPEND),
            "a",
            buffering=1,
            encoding="utf-8",
            errors="backslashreplace",
        )
        self.handler = _LogFileHandler(self.file)
        self.handler.setFormatter(logging.Formatter(self.FORMAT))
        self.handler.setLevel(logging.INFO)
        self.filter = _OffTheTerminal(debug)
        self.loggers: list[logging.Logger] = []
        self._attach()
        self.progress_bars: bool | None = None  # Ray Data's setting, put back by close
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.terminal_fd = os.dup(2)
        self.stderr = sys.stderr
        self.terminal = None
        if _writes_to_fd(sys.stderr, 2):
            self.terminal = open(
                os.dup(self.terminal_fd),
                "w",
                buffering=1,
                encoding=sys.stderr.encoding,
                errors=sys.stderr.errors,
            )
            sys.stderr = self.terminal
        os.dup2(self.file.fileno(), 2)

    def _attach(self) -> None:
        for logger in _ray_loggers():
            if logger in self.loggers:
                continue
            self.loggers.append(logger)
            for handler in _terminal_handlers(logger):
                handler.addFilter(self.filter)
            logger.addHandler(self.handler)

    def settle(self, verbosity: str) -> None:
        """Once Ray runs: the file into the session's log folder, Ray's loggers configured
        since attached, the progress bars as ``verbosity`` and the terminal want them, and on a
        terminal (NORMAL) one line that says where Ray's lines went."""
        self._attach()
        logs = _session_logs_dir()
        if logs is not None and os.path.dirname(self.path) != logs:
            target = os.path.join(logs, f"memscore-{os.getpid()}.log")
            try:
                os.replace(self.path, target)
                self.path = target
            except OSError:  # another filesystem: the file stays where it is
                pass
        from ray.data import DataContext

        context = DataContext.get_current()
        if self.progress_bars is None:
            self.progress_bars = context.enable_progress_bars
        on_terminal = _isatty(sys.stderr)
        # Without a terminal, Ray Data's bars are lines of carriage returns in a file or pipe.
        context.enable_progress_bars = verbosity != QUIET and on_terminal and self.progress_bars
        if verbosity == NORMAL and on_terminal:
            if logs is None:  # Ray Client: the workers' logs are on the cluster's nodes
                workers = ""
            elif os.path.dirname(self.path) == logs:
                workers = ", its workers' to the same folder"
            else:
                workers = f", its workers' to {logs}/"
            print(
                f"memscore: Ray's log lines go to {self.path}{workers} (--verbose prints "
                f"them here)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.handler)
            for handler in logger.handlers:
                handler.removeFilter(self.filter)
        if self.progress_bars is not None:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = self.progress_bars
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(self.terminal_fd, 2)
        os.close(self.terminal_fd)
        if self.terminal is not None:
            if sys.stderr is self.terminal:
                sys.stderr = self.stderr
            self.terminal.close()
        self.file.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _session_logs_dir() -> str | None:
    """The log folder of the Ray session this process is connected to, where it has one on
    this machine (not through Ray Client)."""
    from ray._private import worker

    node = worker._global_node
    try:
        return node.get_logs_dir_path() if node is not None else None
    except (AttributeError, TypeError, OSError):  # no session folder: the file stays put
        return None


def _watch_local_ray(command: _Command) -> None:
    from ray._private import ray_constants, worker

    node = worker._global_node
    watched = []
    for kind, name, log in (
        (ray_constants.PROCESS_TYPE_GCS_SERVER, "GCS", "gcs_server.out"),
        (ray_constants.PROCESS_TYPE_RAYLET, "raylet", "raylet.out"),
    ):
        processes = node.all_processes.get(kind) if node is not None else None
        if processes:  # none where this process joined a Ray instead of starting it
            watched.append((name, processes[0].process, log))
    if watched:
        threading.Thread(
            target=_watch,
            args=(node, watched, command),
            name="memscore-local-ray-watchdog",
            daemon=True,
        ).start()


def _watch(node, watched: list, command: _Command) -> None:
    """Ends the process with one line once the GCS or the raylet of the local Ray it started
    is gone.

    Without it the driver waits for them and exits 1 with a line of Ray's: 60 s for the GCS,
    13 s for the raylet (measured). On the way out: the line, flushed; the node's other
    processes stopped (its raylet, workers and agents would wait for the GCS, holding memory
    and the object store), the raylet and GCS as ``ray.shutdown`` stops them and what they
    started by SIGKILL; nothing else. Python's exit handlers are skipped (``os._exit``):
    ``ray.shutdown`` would wait on the dead GCS, and nothing of memscore's needs them: its
    bookkeeping files are written whole or not at all, so stopping here is no worse than the
    SIGKILL that ``--resume`` is tested against."""
    from ray._private import worker

    while True:
        gone = [
            (name, process, log) for name, process, log in watched if process.poll() is not None
        ]
        if gone:
            break
        time.sleep(WATCH_INTERVAL_S)
        if worker._global_node is not node:
            return
    # ray.shutdown disconnects before it stops the node: then this is no failure
    if (
        not worker.global_worker.connected
        or worker._global_node is not node
        or _command is not command
    ):
        return
    name, process, log = gone[0]
    code = process.returncode
    how = (
        f"killed by {signal.Signals(-code).name}"
        if code < 0 and -code in signal.valid_signals()
        else f"exit code {code}"
    )
    log = os.path.join(node.get_logs_dir_path(), log)
    line = f"the local Ray stopped during the run (its {name} process exited, {how}; log: {log})"
    print(
        f"memscore: error: {line}" + (f": {command.resume_hint}" if command.resume_hint else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        sys.stdout.flush()
        import psutil  # Ray's own copy (ray/thirdparty_files), importable once Ray is

        # Taken before the raylet goes: its agents (dashboard, runtime env) and workers are
        # then no longer this process's descendants, and they outlived it (measured: > 40 s).
        started = psutil.Process().children(recursive=True)
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        for process in started:
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks that the pid is still that process
    finally:
        # 1, not 2: nothing the user did or can fix; 2 is for a stop the user must act on
        os._exit(1)
