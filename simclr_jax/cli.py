"""What the command-line programs share: one-line user errors and a quiet TensorFlow start-up.

main.py, `python -m simclr_jax.export` and `python -m simclr_jax.sweep` start their absl main
with `run(main)`. An error the user fixes by changing an input (config_checks.UserInputError: a
bad config value, a missing path, an unprepared dataset, an unknown split) prints as one line,
`error: <message>`, on stderr and the program exits with status 2; any other exception keeps
its full traceback (a bug to report, not an input to change).

`import_tensorflow_quietly()` imports TensorFlow while dropping the start-up log lines below
TF_CPP_MIN_LOG_LEVEL that TensorFlow 2.21 writes before it applies that variable: "oneDNN
custom operations are on ..." (once per TF library that logs it, so twice) and absl's "All log
messages before absl::InitializeLog() ...". Their other lines still reach stderr, and
TF_CPP_MIN_LOG_LEVEL=0 shows everything. oneDNN itself stays on: TF_ENABLE_ONEDNN_OPTS=0
would silence the line too, but it changes the input pipeline's numerics.

Imports neither jax nor TensorFlow at import time.
"""

import functools
import os
import re
import sys
import threading
from collections.abc import Callable

from simclr_jax.config_checks import UserInputError

USER_ERROR_EXIT_STATUS = 2
# An absl/TF C++ log line: severity letter, MMDD, then time and source.
_LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0-3 drops the letters before it.
_PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"


def error_line(error: BaseException) -> str:
    """'error: <message>' on one line; 'process <i>: error: ...' in a multi-process run."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    line = f"error: {message or type(error).__name__}"
    jax = sys.modules.get("jax")  # Only if the program imported it: never start a backend here.
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
        line = f"process {jax.process_index()}: {line}"
    return line


def exit_on_user_error(main: Callable) -> Callable:
    """Wraps an absl main: a UserInputError prints error_line() and exits with status 2."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserInputError as e:
            sys.stdout.flush()
            print(error_line(e), file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_STATUS)

    return wrapped


def run(main: Callable) -> None:
    """absl.app.run(main) with user errors as one line and exit status 2."""
    from absl import app

    app.run(exit_on_user_error(main))


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _is_start_up_noise(line: str, min_level: int) -> bool:
    if min_level <= 0:
        return False
    if line.startswith(_PRE_INIT_NOTICE):
        return True
    match = _LOG_LINE.match(line)
    return bool(match) and _SEVERITIES.index(match.group(1)) < min_level


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow, dropping its start-up log lines below TF_CPP_MIN_LOG_LEVEL.

    TensorFlow's C++ code writes them straight to file descriptor 2, so for the import only
    fd 2 is a pipe, and a thread forwards every line worth keeping to the real stderr as it
    arrives (so a fatal message, e.g. of a CPU without the instructions TensorFlow was built
    for, still shows before the process dies). Call it before anything else imports
    TensorFlow (a no-op once it is imported).
    """
    if "tensorflow" in sys.modules:
        return
    min_level = _min_log_level()
    if min_level <= 0:
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _is_start_up_noise(line.decode(errors="replace"), min_level):
                    os.write(saved, line)

    forwarder = threading.Thread(target=forward, name="tf-import-stderr", daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)  # fd 2 is now the pipe's only writer
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's writer: the forwarder reads to the end and stops
        forwarder.join()
        os.close(saved)
