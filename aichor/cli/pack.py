"""Pack a working tree as a tar: .gitignore files honoured (each applies below its own folder),
.git left out. Headers are planned first and contents sent straight from the files while the
request goes out, so a tree of any size costs a few megabytes of memory."""

import bisect
import hashlib
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
    link: str = ""  # a hard link's target (an earlier member): its header is made again alike


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


def plan_tar(root: Path, files: list[str], headers_digest=None) -> tuple[list[Member], int]:
    """Each member's header and content sizes, and so the archive's exact length, before a byte
    is sent. Knowing the length lets the request declare it (the server refuses an archive over
    its limit before any content goes out) and lets file contents go from the page cache to the
    socket with sendfile instead of through Python: three copies a byte fewer. `headers_digest`
    (a hashlib object), when given, is fed every header: the tree's fingerprint (names, sizes,
    times), by which an interrupted upload of the same tree is resumed."""
    tar, members = _pass(), []
    total = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks
    for rel in files:
        made = _header(tar, root / rel, rel)
        if made is not None:
            header, size = made
            link = tar.inodes.get(_inode(root / rel), rel)
            members.append(Member(root / rel, rel, len(header), size, link if link != rel else ""))
            total += len(header) + size + (-size % tarfile.BLOCKSIZE)
            if headers_digest is not None:
                headers_digest.update(header)
    return members, total


def _inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_dev


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
    with _open_member(member) as fh:
        _send_file(sock, fh, member, 0, member.size, progress)
        if os.fstat(fh.fileno()).st_size != member.size:
            raise _changed(member)  # it grew: what was sent is a torn copy


def _send_file(sock: socket.socket, fh, member: Member, offset: int, count: int, progress) -> None:
    end = offset + count
    while offset < end:
        if isinstance(sock, ssl.SSLSocket):
            # TLS encrypts in user space: no sendfile, and socket.sendfile's 8 KiB fallback
            # reads would cap the upload; whole pieces instead.
            fh.seek(offset)
            piece = fh.read(min(CHUNK, end - offset))
            sock.sendall(piece)
            n = len(piece)
        else:
            n = sock.sendfile(fh, offset=offset, count=min(8 * CHUNK, end - offset))
        if n == 0:
            raise _changed(member)  # it shrank
        offset += n
        if progress is not None:
            progress(n)


# --- Parts: any byte range of the planned archive, made on demand -------------------------
class Layout:
    """Where each member's header, content and padding sit in the planned archive, so a part
    (a byte range) can be hashed or sent on its own, in any order and from several threads,
    reading only the files it covers."""

    def __init__(self, members: list[Member], total: int) -> None:
        self.members, self.total = members, total
        self.starts: list[int] = []
        position = 0
        for member in members:
            self.starts.append(position)
            position += member.header_size + member.size + (-member.size % tarfile.BLOCKSIZE)

    def pieces(self, start: int, end: int) -> Iterator[bytes | tuple[Member, int, int]]:
        """The bytes of [start, end): header and padding bytes, and (member, offset, count) for
        file content, read by the caller."""
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        position = start
        while position < end:
            if index >= len(self.members):
                yield bytes(end - position)  # the end-of-archive blocks
                return
            member, base = self.members[index], self.starts[index]
            content = base + member.header_size
            padding = content + member.size
            after = padding + (-member.size % tarfile.BLOCKSIZE)
            if position < content:
                stop = min(end, content)
                yield _header_again(member)[position - base : stop - base]
            elif position < padding:
                stop = min(end, padding)
                yield member, position - content, stop - position
            elif position < after:
                stop = min(end, after)
                yield bytes(stop - position)
            else:
                index += 1
                continue
            position = stop


def _header_again(member: Member) -> bytes:
    tar = _pass()
    try:
        if member.link:
            # The plan saw this inode first under `link`: the same header (a hard link) again.
            tar.inodes[_inode(member.path)] = member.link
        made = _header(tar, member.path, member.arcname)
    except OSError:
        raise _changed(member) from None  # deleted or renamed meanwhile
    if made is None or len(made[0]) != member.header_size or made[1] != member.size:
        raise _changed(member)
    return made[0]


def _open_member(member: Member):
    try:
        fh = open(member.path, "rb")
    except OSError as exc:
        raise TreeChanged(f"cannot read {member.arcname}: {exc.strerror}: nothing was submitted") from None
    if os.fstat(fh.fileno()).st_size != member.size:
        fh.close()
        raise _changed(member)
    return fh


def hash_range(layout: Layout, start: int, end: int, buffer: bytearray | None = None) -> bytes:
    """The SHA-256 of the archive's bytes [start, end)."""
    digest = hashlib.sha256()
    view = memoryview(buffer if buffer is not None else bytearray(4 * CHUNK))
    for piece in layout.pieces(start, end):
        if isinstance(piece, bytes):
            digest.update(piece)
            continue
        member, offset, count = piece
        with _open_member(member) as fh:
            fh.seek(offset)
            while count:
                n = fh.readinto(view[: min(count, len(view))])
                if not n:
                    raise _changed(member)  # it shrank
                digest.update(view[:n])  # hashlib lets go of the GIL for pieces this size
                count -= n
            if os.fstat(fh.fileno()).st_size != member.size:
                raise _changed(member)
    return digest.digest()


def send_range(
    sock: socket.socket, layout: Layout, start: int, end: int, progress: Callable[[int], object] | None = None
) -> None:
    """Write the archive's bytes [start, end) to `sock`, file contents with sendfile."""
    for piece in layout.pieces(start, end):
        if isinstance(piece, bytes):
            sock.sendall(piece)
            if progress is not None:
                progress(len(piece))
            continue
        member, offset, count = piece
        with _open_member(member) as fh:
            _send_file(sock, fh, member, offset, count, progress)
            if os.fstat(fh.fileno()).st_size != member.size:
                raise _changed(member)
