"""`submit local` to a server whose archives live in object storage: the archive goes in parts
straight to S3, by URLs the server signs, and the server completes it (experiments.multipart).

Each part is hashed (SHA-256) a little ahead of being sent, the server signs its URL for that
digest in batches, and a few threads send the parts from the files with sendfile, so memory
stays a few MiB whatever the size. An interrupted run leaves its parts in S3: a re-run of the
unchanged tree announces the same fingerprint, is handed the same upload and sends only the
parts missing."""

import base64
import hashlib
import http.client
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from urllib.parse import urlsplit
from xml.etree import ElementTree

from aichor.cli.client import Client, CliError, _connection
from aichor.cli.pack import Layout, TreeChanged, hash_range, send_range

# Parts sent at once, and hashed ahead of the sending (bounded, so that the parts hashed are
# still in the page cache when they are sent).
CONCURRENCY = int(os.environ.get("AICHOR_UPLOAD_CONCURRENCY", "6"))
HASH_AHEAD = 32
SIGN_BATCH = 64
ATTEMPTS = 4


class Upload:
    def __init__(self, client: Client, slug: str, layout: Layout, started: dict) -> None:
        self.client, self.layout = client, layout
        self.path = f"/projects/{slug}/experiments/uploads/{started['upload']}"
        self.part_size, self.parts = started["part_size"], started["parts"]
        self.held = {p["number"]: p for p in started["uploaded"]}
        self.stop = threading.Event()
        self.local = threading.local()

    def span(self, number: int) -> tuple[int, int]:
        start = (number - 1) * self.part_size
        return start, min(start + self.part_size, self.layout.total)

    def already_held(self, number: int, digest: str) -> bool:
        """S3 holds this part with these bytes (by its size, and its checksum where S3 says)."""
        part = self.held.get(number)
        start, end = self.span(number)
        return part is not None and part["size"] == end - start and part.get("sha256", "") in ("", digest)

    def resumed_bytes(self) -> int:
        return sum(p["size"] for n, p in self.held.items() if p["size"] == self.span(n)[1] - self.span(n)[0])

    # --- the run ---------------------------------------------------------------------------
    def send(self, progress: Callable[[int], object]) -> dict[int, str]:
        """Send every part S3 lacks; returns each part's SHA-256 (base64)."""
        digests: dict[int, str] = {}
        hashing = ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="hash")
        sending = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="part")
        buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        hashed: dict[int, Future] = {}
        in_flight: set[Future] = set()
        to_sign: list[int] = []
        upcoming = iter(range(1, self.parts + 1))

        def digest_of(number: int) -> str:
            try:
                buffer = buffers.get_nowait()
            except queue.Empty:
                buffer = bytearray(4 * 1024 * 1024)
            try:
                return base64.b64encode(hash_range(self.layout, *self.span(number), buffer)).decode()
            finally:
                buffers.put(buffer)

        def hash_more() -> None:
            while len(hashed) < HASH_AHEAD and (number := next(upcoming, None)) is not None:
                hashed[number] = hashing.submit(digest_of, number)

        def settle(block: bool) -> None:
            """Drop the sends that are done; the first failure ends the run."""
            done = wait(in_flight, return_when=FIRST_COMPLETED)[0] if block else {f for f in in_flight if f.done()}
            for future in done:
                future.result()
                in_flight.discard(future)

        try:
            hash_more()
            for number in range(1, self.parts + 1):
                digests[number] = hashed.pop(number).result()
                hash_more()
                if not self.already_held(number, digests[number]):
                    to_sign.append(number)
                settle(block=False)
                # Sign when the senders' queue runs short, taking every part already hashed,
                # else in batches: one request signs many parts, and the server stays out of
                # the way.
                more_ready = number + 1 in hashed and hashed[number + 1].done()
                short = len(in_flight) < 2 * CONCURRENCY and not more_ready
                if to_sign and (short or len(to_sign) >= SIGN_BATCH or number == self.parts):
                    for url, headers, n in self.sign(to_sign, digests):
                        in_flight.add(sending.submit(self.put_part, n, url, headers, digests, progress))
                    to_sign = []
                while len(in_flight) >= 2 * CONCURRENCY + SIGN_BATCH:
                    settle(block=True)  # hashed far enough ahead: let the senders catch up
            while in_flight:
                settle(block=True)
        finally:
            self.stop.set()
            hashing.shutdown(wait=False, cancel_futures=True)
            sending.shutdown(wait=False, cancel_futures=True)
        return digests

    def sign(self, numbers: list[int], digests: dict[int, str]) -> list[tuple[str, dict, int]]:
        signed = self.client.post(
            f"{self.path}/parts",
            json={"parts": [{"number": n, "sha256": digests[n]} for n in numbers]},
            not_found="the upload was refused: run the command again",
        )
        return [(p["url"], p["headers"], p["number"]) for p in signed["parts"]]

    def put_part(self, number: int, url: str, headers: dict, digests: dict, progress) -> None:
        start, end = self.span(number)
        for attempt in range(1, ATTEMPTS + 1):
            if self.stop.is_set():
                return
            sent = 0

            def counted(n: int) -> None:
                nonlocal sent
                sent += n
                progress(n)

            try:
                status, body = self._put(url, headers, start, end, counted)
            except (OSError, http.client.HTTPException) as exc:
                status, body = None, str(exc)
            if status is not None and 200 <= status < 300:
                return
            progress(-sent)  # counted again by the next attempt
            code = _s3_code(body)
            if code == "BadDigest":
                raise TreeChanged("a file changed while it was being uploaded: nothing was submitted, try again")
            if status == 403 and code in ("AccessDenied", "RequestExpired", "ExpiredToken"):
                # The signed URL expired (a slow link): ask for a fresh one.
                url, headers, _ = self.sign([number], digests)[0]
            elif status is not None and status < 500 and status != 403:
                raise CliError(f"object storage refused part {number}: {code or status}: {_s3_message(body)}")
            if attempt == ATTEMPTS:
                raise CliError(f"sending part {number} to object storage failed {ATTEMPTS} times: {code or body}")

    def _put(self, url: str, headers: dict, start: int, end: int, progress) -> tuple[int, bytes]:
        """One PUT of the part on this thread's connection to the host (kept alive between parts)."""
        parts = urlsplit(url)
        conns = self.local.__dict__.setdefault("conns", {})
        if (parts.scheme, parts.netloc) not in conns:
            conn, target, proxy_headers = _connection(parts)
            # Through a plain-HTTP proxy the request names the absolute URL.
            conns[parts.scheme, parts.netloc] = (conn, target.startswith("http"), proxy_headers)
        conn, absolute, proxy_headers = conns[parts.scheme, parts.netloc]
        target = url if absolute else parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.putrequest("PUT", target, skip_accept_encoding=True)
            for name, value in {**headers, **proxy_headers, "Content-Length": str(end - start)}.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                send_range(conn.sock, self.layout, start, end, progress)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused midway: the answer says why
            response = conn.getresponse()
            body = response.read()
            if response.will_close:
                conn.close()
            return response.status, body
        except BaseException:
            conn.close()  # reopened by the next request; never reused half-way through one
            raise


def _s3_code(body) -> str:
    return _xml_field(body, "Code")


def _s3_message(body) -> str:
    return _xml_field(body, "Message") or (body.decode(errors="replace")[:200] if isinstance(body, bytes) else body)


def _xml_field(body, name: str) -> str:
    if not isinstance(body, bytes) or not body.strip():
        return ""
    try:
        found = ElementTree.fromstring(body).find(name)
    except ElementTree.ParseError:
        return ""
    return (found.text or "") if found is not None else ""


def fingerprint(headers_digest: "hashlib._Hash", total: int) -> str:
    return hashlib.sha256(headers_digest.digest() + str(total).encode()).hexdigest()
