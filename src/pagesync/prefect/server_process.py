"""The local Prefect server's process: Prefect's server app under uvicorn, leaving when idle.

Started by `pagesync.prefect.local_server` as `python -m pagesync.prefect.server_process`. It serves what
`uvicorn --factory prefect.server.api.server:create_app` serves (the settings come from
its environment), and counts the requests in flight: with `--idle` above zero it leaves
once no run uses it (see `pagesync.prefect.local_server`) and it has served nothing for that long.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from pagesync.prefect.local_server import ServerFiles, locked

#: How often the server asks itself whether to leave.
TICK = 1.0


class Activity:
    """ASGI middleware: how many requests (and websockets) are open, and when the last
    one ended."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open = 0
        self.last = time.monotonic()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()


async def leave_when_idle(server: Any, activity: Activity, files: ServerFiles, idle: float) -> None:
    """Ask uvicorn to stop once nothing is open, no run uses the server, and `idle`
    seconds passed since the last request; decided under the lock runs join by."""
    while not server.should_exit:
        await asyncio.sleep(TICK)  # a watchdog's tick, not a wait for something
        if activity.open or time.monotonic() - activity.last < idle:
            continue
        with locked(files.lock, wait=False) as mine:
            if not mine or files.live_clients():
                continue
            files.forget(os.getpid())
            server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagesync.prefect.server_process")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle", type=float, required=True)
    p.add_argument("--home", type=Path, required=True)
    args = p.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app

    files = ServerFiles(args.home)
    activity = Activity(create_app())
    server = uvicorn.Server(
        uvicorn.Config(
            activity,
            host="127.0.0.1",
            port=args.port,
            log_level="error",
            lifespan="on",
            # Loopback only: compressing each event on the websocket costs both ends CPU
            # and saves nothing.
            ws_per_message_deflate=False,
        )
    )

    async def serve() -> None:
        watchdog = None
        if args.idle > 0:
            watchdog = asyncio.create_task(leave_when_idle(server, activity, files, args.idle))
        try:
            await server.serve()
        finally:
            if watchdog is not None:
                watchdog.cancel()

    try:
        asyncio.run(serve())
    finally:
        files.forget(os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
