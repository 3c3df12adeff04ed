"""Pack a working tree as a tar: .gitignore files honoured (each applies below its own folder),
.git left out. Headers are planned first and contents sent straight from the files while the
request goes out, so a tree of any size costs a few megabytes of memory."""

import io
import os
import socket
import ssl
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Member:
    path: Path
    arcname: str
    header_size: int  # the tar header block(s), PAX records included
    size: int  # content bytes after the header: regular files only


class TreeChanged(Exception):
    """A file changed between planning the archive and sending it."""


def _header(tar: tarfile.TarFile, path: Path, arcname: str) -> tuple[bytes, int] | None:
    # The same TarFile for a whole pass: a second name for an inode becomes a hard link.
    info = tar.gettarinfo(path, arcname=arcname)
    if info is None:
        return None  # a socket: tarfile.add leaves those out too
    return info.tobuf(tarfile.PAX_FORMAT, tar.encoding, tar.errors), info.size if info.isreg() else 0


def _pass() -> tarfile.TarFile:
    return tarfile.TarFile(fileobj=io.BytesIO(), mode="w", format=tarfile.PAX_FORMAT)


def plan_tar(root: Path, files: list[str]) -> tuple[list[Member], int]:
    """Each member's header and content sizes, and so the archive's exact length, before a byte
    is sent. Knowing the length lets the request declare it (the server refuses an archive over
    its limit before any content goes out) and lets file contents go from the page cache to the
    socket with sendfile instead of through Python: three copies a byte fewer."""
    tar, members = _pass(), []
    total = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks
    for rel in files:
        made = _header(tar, root / rel, rel)
        if made is not None:
            header, size = made
            members.append(Member(root / rel, rel, len(header), size))
            total += len(header) + size + (-size % tarfile.BLOCKSIZE)
    return members, total


def send_tar(sock: socket.socket, members: list[Member], progress: Callable[[int], object] | None = None) -> None:
    """Write the planned archive to `sock`. Headers are made again as they go (a tree of many
    files keeps only their sizes in memory); if anything no longer matches the plan, TreeChanged
    is raised and the caller drops the connection, so the server keeps nothing."""
    tar, zeros = _pass(), bytes(tarfile.BLOCKSIZE)
    for member in members:
        try:
            made = _header(tar, member.path, member.arcname)
        except OSError:
            raise _changed(member) from None  # deleted or renamed meanwhile
        if made is None or len(made[0]) != member.header_size or made[1] != member.size:
            raise _changed(member)
        sock.sendall(made[0])
        if member.size:
            _send_content(sock, member, progress)
            sock.sendall(zeros[: -member.size % tarfile.BLOCKSIZE])
    sock.sendall(zeros * 2)


def _changed(member: Member) -> TreeChanged:
    return TreeChanged(f"{member.arcname} changed while it was being uploaded: nothing was submitted, try again")


def _send_content(sock: socket.socket, member: Member, progress) -> None:
    changed = _changed(member)
    try:
        fh = open(member.path, "rb")
    except OSError as exc:
        raise TreeChanged(f"cannot read {member.arcname}: {exc.strerror}: nothing was submitted") from None
    with fh:
        if os.fstat(fh.fileno()).st_size != member.size:
            raise changed
        sent = 0
        while sent < member.size:
            if isinstance(sock, ssl.SSLSocket):
                # TLS encrypts in user space: no sendfile, and socket.sendfile's 8 KiB fallback
                # reads would cap the upload; whole pieces instead.
                count = min(CHUNK, member.size - sent)
                fh.seek(sent)
                piece = fh.read(count)
                sock.sendall(piece)
                n = len(piece)
            else:
                n = sock.sendfile(fh, offset=sent, count=min(8 * CHUNK, member.size - sent))
            if n == 0:
                raise changed  # it shrank
            sent += n
            if progress is not None:
                progress(n)
        if os.fstat(fh.fileno()).st_size != member.size:
            raise changed  # it grew: what was sent is a torn copy
