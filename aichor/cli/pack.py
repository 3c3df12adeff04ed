"""Pack a working tree as a tar stream: .gitignore files honoured (each applies below its own
folder), .git left out. The stream is produced while it is sent, through a pipe, so a tree
of any size costs a few megabytes of memory."""

import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pathspec

CHUNK = 1024 * 1024


def iter_files(root: Path) -> Iterator[str]:
    """Paths (relative, "/"-separated) of what a `git add -A` would take, .git excluded."""
    specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []

    def ignored(rel: str, is_dir: bool) -> bool:
        for base, spec in specs:
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1 :] if base else rel
            if spec.match_file(sub + "/" if is_dir else sub):
                return True
        return False

    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        gitignore = Path(dirpath) / ".gitignore"
        if gitignore.is_file():
            specs.append(
                (rel_dir, pathspec.GitIgnoreSpec.from_lines(gitignore.read_text(errors="replace").splitlines()))
            )
        prefix = f"{rel_dir}/" if rel_dir else ""

        def join(name: str, prefix: str = prefix) -> str:
            return prefix + name

        dirnames[:] = sorted(
            d for d in dirnames if d != ".git" and not ignored(join(d), not os.path.islink(os.path.join(dirpath, d)))
        )
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                yield join(d)  # a symlink is packed as a link, never followed
        for name in sorted(filenames):
            if name != ".git" and not ignored(join(name), False):
                yield join(name)


def tree_size(root: Path, files: list[str]) -> int:
    return sum(os.lstat(root / f).st_size for f in files)


def tar_stream(root: Path, files: list[str], progress=None) -> Iterator[bytes]:
    """The tar of `files`, as chunks. A writer thread feeds a pipe; errors surface here."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl

        # A 1 MiB pipe (Linux) instead of 64 KiB: fewer, larger chunks on the wire.
        fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
    except (ImportError, OSError):
        pass
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=CHUNK) as out:
                # bufsize: tarfile's stream mode re-slices its buffer per `bufsize` bytes written;
                # at the default 10 KiB that copying capped packing near 300 MiB/s.
                with tarfile.open(
                    fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK, copybufsize=CHUNK
                ) as tar:
                    for rel in files:
                        tar.add(root / rel, arcname=rel, recursive=False)
        except BaseException as exc:  # reported to the reader, which owns the user's attention
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(CHUNK):
                if progress is not None:
                    progress(len(chunk))
                yield chunk
    finally:
        writer.join()
    if failure and not isinstance(failure[0], BrokenPipeError):
        raise failure[0]
