"""File I/O for workdirs that may live on local disk or on cloud storage (gs://...).

Every file this package writes or reads itself (config.json, results.json,
metrics.jsonl, the ablation's manifest and cell files, exports) goes through
these helpers, so `--workdir=gs://BUCKET/run` works the same as a local
directory. (Orbax checkpoints and clu's TensorBoard writer handle gs://
themselves.)

Local paths use os and open() directly: no TensorFlow import, and behaviour is
exactly that of plain files. Paths with a scheme ('gs://', 'ram://', ...) go
through tf.io.gfile, imported on first use, so processes that only touch local
files (the ablation tool's parent process, simclr_jax.sweep) never pay for
importing TensorFlow.

Atomic writes: write_text/write_bytes never leave a half-written file at the
destination. Locally they write a temporary file beside it and os.replace() it.
On other filesystems they write the whole temporary object and rename it over
the destination; on object stores (GCS) an object is only visible once its
upload completes and the rename is a server-side copy that replaces the
destination object whole, so a reader sees the old or the new content. The
rename also makes overwrites correct on filesystems whose 'w' mode does not
truncate an existing file (TensorFlow's in-memory 'ram://').

Appending: object stores cannot append. open_append() returns a writer that
appends to local files for real; elsewhere it keeps the file's content in
memory (the existing object, then every line written) and rewrites the whole
object atomically at each flush(). That suits small line logs such as
metrics.jsonl (a few hundred KB for a long run), not large files.
"""

import os
import posixpath

# Every run's final figures, in its workdir (pretraining and every evaluation protocol).
RESULTS_FILE = "results.json"
# The full config of a pretraining run, in its workdir (evaluations rebuild the model from it).
CONFIG_FILE = "config.json"

TMP_SUFFIX = ".tmp"


def is_remote(path: str) -> bool:
    """Whether path names a non-local filesystem ('gs://...', 'ram://...'): has a scheme."""
    return "://" in str(path)


def _gfile():
    # Imported here: importing TensorFlow takes seconds, and local paths never need it.
    import tensorflow as tf

    return tf.io.gfile


def join(*parts: str) -> str:
    """Joins path components; remote paths always use '/' (and keep their scheme)."""
    if is_remote(parts[0]):
        return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])
    return os.path.join(*parts)


def abspath(path: str) -> str:
    """os.path.abspath for local paths; remote paths are already absolute and kept as they are."""
    return path if is_remote(path) else os.path.abspath(path)


def dirname(path: str) -> str:
    """The parent directory of path (ignoring a trailing '/')."""
    if is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(path.rstrip(os.sep))


def basename(path: str) -> str:
    """The last component of path (ignoring a trailing '/')."""
    if is_remote(path):
        return posixpath.basename(path.rstrip("/"))
    return os.path.basename(path.rstrip(os.sep))


def exists(path: str) -> bool:
    """Whether a file or directory exists at path."""
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """Whether path is a directory (on object stores: a prefix with objects under it)."""
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    """Creates path and its parents; no error if it exists."""
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """The names in directory path (no trailing '/'), unsorted.

    Raises:
      FileNotFoundError: path is not a directory.
    """
    if not isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if is_remote(path):
        # GCS lists sub-prefixes as 'name/'.
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def remove(path: str) -> None:
    """Deletes the file at path."""
    if is_remote(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def read_bytes(path: str) -> bytes:
    """The content of the file at path."""
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The content of the file at path, decoded as UTF-8."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes | memoryview) -> None:
    """Writes data to path atomically (see the module docstring); the parent must exist.

    Args:
      path: destination; replaced if it exists.
      data: the whole new content (bytes or any bytes-like object).
    """
    tmp = path + TMP_SUFFIX
    if not is_remote(path):
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    gfile = _gfile()
    if gfile.exists(tmp):  # a leftover of a killed write; 'w' may not truncate it
        gfile.remove(tmp)
    with gfile.GFile(tmp, "wb") as f:
        f.write(bytes(data))  # GFile takes bytes, not memoryviews
    gfile.rename(tmp, path, overwrite=True)


def write_text(path: str, text: str) -> None:
    """Writes text (UTF-8) to path atomically; the parent directory must exist."""
    write_bytes(path, text.encode("utf-8"))


class AppendFile:
    """A text file opened for appending; see open_append()."""

    def __init__(self, path: str):
        self.path = path
        self._local = None
        self._chunks: list[str] = []
        self._dirty = False
        if is_remote(path):
            if exists(path):
                self._chunks.append(read_text(path))
        else:
            self._local = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, text: str) -> None:
        """Appends text; it reaches the file at the next flush() or close()."""
        if self._local is not None:
            self._local.write(text)
        else:
            self._chunks.append(text)
            self._dirty = True

    def flush(self) -> None:
        """Makes everything written so far visible in the file."""
        if self._local is not None:
            self._local.flush()
        elif self._dirty:
            content = "".join(self._chunks)
            self._chunks = [content]
            write_text(self.path, content)
            self._dirty = False

    def close(self) -> None:
        """Flushes and closes; further writes are an error for local files."""
        self.flush()
        if self._local is not None:
            self._local.close()

    def __enter__(self) -> "AppendFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_append(path: str) -> AppendFile:
    """Opens a text file for appending, creating it if needed; the parent must exist.

    Local files are appended to for real. Elsewhere (object stores cannot
    append) the existing content is read once, kept in memory with every line
    written after it, and the whole object is rewritten atomically at each
    flush(): a reader always sees a complete file. Only one writer per file.

    Args:
      path: the file.

    Returns:
      An AppendFile with write(text), flush() and close(); also a context manager.
    """
    return AppendFile(path)
