"""What `submit local` puts on the wire: a planned tar sent with sendfile, its exact length known
before the first byte, and nothing sent when the server refuses up front."""

import io
import os
import socket
import tarfile
import threading

import pytest

from aichor.cli.client import Client, CliError
from aichor.cli.pack import TreeChanged, iter_files, plan_tar, send_tar


def make_tree(root):
    files = {
        "train.py": b"print('hi')\n",
        "data/big.bin": os.urandom(3 * 1024 * 1024 + 7),  # not a multiple of the block size
        "data/empty.txt": b"",
        # Longer than ustar's 100 characters and not ASCII: needs PAX records.
        "deep/" + "d" * 120 + "/é-ü.txt": "données\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("train.py", root / "link.py")
    os.link(root / "train.py", root / "hard.py")
    return files


class Sink:
    """A real TCP connection whose far end keeps everything it receives."""

    def __init__(self) -> None:
        server = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(server.getsockname())
        self.peer, _ = server.accept()
        server.close()
        self.received = bytearray()
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.peer.recv(1 << 20):
            self.received += chunk

    def finish(self) -> bytes:
        self.client.shutdown(socket.SHUT_WR)
        self.reader.join(10)
        self.client.close()
        self.peer.close()
        return bytes(self.received)


def test_planned_archive_has_the_declared_length_and_every_file(tmp_path):
    files = make_tree(tmp_path)
    names = list(iter_files(tmp_path))
    members, length = plan_tar(tmp_path, names)
    sink = Sink()
    progress = []
    send_tar(sink.client, members, progress=progress.append)
    data = sink.finish()

    assert len(data) == length
    assert sum(progress) == sum(len(v) for v in files.values())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for rel, content in files.items():
            assert tar.extractfile(rel).read() == content, rel
        assert tar.getmember("link.py").issym() and tar.getmember("link.py").linkname == "train.py"
        # One inode, two names: stored once, the second name a hard link to the first.
        linked = [tar.getmember(n) for n in ("hard.py", "train.py")]
        assert sorted(m.islnk() for m in linked) == [False, True]


@pytest.mark.parametrize("change", ["shrink", "grow", "delete"])
def test_a_file_changed_after_planning_stops_the_upload(tmp_path, change):
    make_tree(tmp_path)
    members, _ = plan_tar(tmp_path, list(iter_files(tmp_path)))
    if change == "delete":
        (tmp_path / "data/big.bin").unlink()
    else:
        with open(tmp_path / "data/big.bin", "r+b") as fh:
            if change == "shrink":
                fh.truncate(1000)
            else:
                fh.seek(0, os.SEEK_END)
                fh.write(b"more")
    sink = Sink()
    with pytest.raises(TreeChanged, match="data/big.bin changed while it was being uploaded"):
        send_tar(sink.client, members)
    sink.finish()


def test_a_refusal_up_front_means_no_body_is_sent(tmp_path, monkeypatch):
    """The request waits for 100 Continue: a server that answers 413 at once gets no body."""
    server = socket.create_server(("127.0.0.1", 0))
    got = {}

    def serve() -> None:
        conn, _ = server.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        got["head"] = head
        body = b'{"detail": "the archive (5000000 bytes) is larger than the limit of 1000 bytes"}'
        conn.sendall(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        conn.settimeout(2)
        try:
            got["after"] = conn.recv(1 << 20)  # b"" once the client closes
        except TimeoutError:
            got["after"] = b"(nothing, connection left open)"
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    client = Client(url=f"http://127.0.0.1:{server.getsockname()[1]}", token="aichor_test")
    sent = []
    with pytest.raises(CliError, match=r"larger than the limit of 1000 bytes \(HTTP 413\)"):
        client.upload(
            "/projects/p/experiments/archive",
            params={"manifest_path": "m.yaml"},
            length=5_000_000,
            content_type="application/x-tar",
            send_body=lambda sock: sent.append(sock.sendall(b"x" * 5_000_000)),
        )
    thread.join(10)
    server.close()
    assert b"expect: 100-continue" in got["head"].lower()
    assert b"content-length: 5000000" in got["head"].lower()
    assert sent == [] and not got["after"].startswith(b"x")
