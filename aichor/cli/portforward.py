"""`aichor experiments port-forward`: a local TCP listener; each accepted connection gets its
own WebSocket to the server, which connects to the port inside the experiment's process."""

import asyncio
import sys
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

READ_SIZE = 64 * 1024


def ws_url(http_url: str, experiment_id: str, port: int, process: str | None) -> str:
    parts = urlsplit(http_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = f"?process={quote(process)}" if process else ""
    return (
        f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/experiments/{experiment_id}/port-forward/{port}/{query}"
    )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str, origin: str, token: str) -> None:
    try:
        async with connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, origin=origin, max_size=None, compression=None
        ) as ws:

            async def upstream() -> None:
                while data := await reader.read(READ_SIZE):
                    await ws.send(data)
                await ws.close()

            async def downstream() -> None:
                async for message in ws:
                    writer.write(message if isinstance(message, bytes) else message.encode())
                    await writer.drain()

            tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
    except InvalidStatus as exc:
        print(f"port-forward refused: HTTP {exc.response.status_code}", file=sys.stderr)
    except (OSError, ConnectionClosed) as exc:
        if getattr(exc, "rcvd", None) and exc.rcvd.code >= 4000:
            print(f"port-forward closed: {exc.rcvd.reason or exc.rcvd.code}", file=sys.stderr)
    finally:
        writer.close()


async def serve(http_url: str, token: str, experiment_id: str, port: int, process: str | None, local_port: int):
    url = ws_url(http_url, experiment_id, port, process)
    origin = f"{urlsplit(http_url).scheme}://{urlsplit(http_url).netloc}"
    server = await asyncio.start_server(lambda r, w: _pipe(r, w, url, origin, token), host="127.0.0.1", port=local_port)
    bound = server.sockets[0].getsockname()[1]
    print(f"Forwarding 127.0.0.1:{bound} -> experiment {experiment_id} port {port} (Ctrl-C to stop)", flush=True)
    async with server:
        await server.serve_forever()
