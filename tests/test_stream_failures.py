"""A stream's failure paths on a real server: each ends with its defined close code, logs once, and loses nothing
that was stored or could still be.

- A user's reconnect replaces their stream stuck on a client that stopped reading (MAX_STREAMS_PER_USER=1): the new
  stream is ready at once, not after the old client's send timeout; the old stream still finishes and is stored.
- The model pool full mid-stream (a real `PoolSaturated`): 1013 with an `error` event `server_full`.
- An unexpected error in the pipeline, and `Pipeline.finish()` failing: 1011 `internal_error`, one ERROR line with
  the traceback, and the stream's end (speaker state, the conversation's end, the close) still happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
from conftest import ServerProcess, pcm16_frames, start_server, stop_server
from deepgram_server import ThreadedDeepgramTestServer
from test_backpressure import feed_speech_until, speech, transcribed_words, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

URL = "/v4/listen?codec=pcm16&sample_rate=16000"


def unsent_bytes(server_port: int, client_port: int) -> int:
    """The server side's send queue (bytes written, not yet acknowledged) of one loopback connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                return int(fields[4].split(":")[0], 16)
    return 0


def stored_words(server: ServerProcess, uid: str) -> int:
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {uid}"}, timeout=30) as http:
        conversations = http.get("/v1/conversations").json()
        return sum(len(s["text"].split()) for c in conversations
                   for s in http.get(f"/v1/conversations/{c['id']}").json()["transcript_segments"])


async def test_a_reconnect_replaces_a_stream_stuck_on_its_client_at_once(tmp_path):
    """The first connection stops reading (4 KiB receive buffer, the library reads one message) while its stream
    keeps producing segments, until the server's send to it is stuck: the kernel's buffers are full (the server's
    send queue stops growing). The same user then reconnects. Before, `_admit` awaited the old client's close,
    which waited for that stuck send for WS_SLOW_CLIENT_TIMEOUT_S (10 s here); now the new stream is ready in well
    under that, and the old stream still ends as any stream: its audio transcribed and stored, its client closed
    (1008: it never read), one `stream closed` line each."""
    uid, headers = "reconnects", {"Authorization": "Bearer reconnects"}
    slow_timeout_s = 10.0
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.01, result_every_s=0.05) as deepgram:
        server = start_server(tmp_path, STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url, DEEPGRAM_API_KEY="dg-key",
                              JOBS_ENABLED="false", MAX_STREAMS_PER_USER="1", IDLE_TIMEOUT_S="300",
                              WS_SLOW_CLIENT_TIMEOUT_S=str(slow_timeout_s), UVICORN_WS_PING_INTERVAL="600")
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            client_port = sock.getsockname()[1]
            async with connect(server.ws + URL, sock=sock, additional_headers=headers, max_queue=1,
                               compression=None, ping_interval=None, open_timeout=30, close_timeout=5) as stuck:
                stop_feeding = asyncio.Event()  # results keep coming while it is fed: the buffers fill
                feeder = asyncio.create_task(feed_speech_until(stuck, stop_feeding))
                # Stuck: the server's send queue to this client has stopped growing for 2 s while segments keep
                # coming, so what the server sends now waits in its own transport (over 64 KiB: send blocks).
                deadline, sizes = time.monotonic() + 120, []
                while len(sizes) < 4 or not (sizes[-1] == sizes[-4] > 0):
                    assert time.monotonic() < deadline, f"the server's sends never got stuck: {sizes[-5:]}"
                    await asyncio.sleep(0.5)
                    sizes.append(unsent_bytes(server.port, client_port))
                await asyncio.sleep(4.0)
                stop_feeding.set()
                await feeder

                started = time.monotonic()
                async with connect(server.ws + URL, additional_headers=headers, open_timeout=60) as again:
                    while True:
                        message = json.loads(await asyncio.wait_for(again.recv(), 60))
                        if isinstance(message, dict) and message.get("status") == "ready":
                            break
                    ready_s = time.monotonic() - started
                    await again.send(pcm16_frames(speech(1.0))[0])
                # The stuck client reads at last, after the slow-client timeout: its sends stayed stuck, so its
                # close is 1008, while its successor was served.
                await asyncio.sleep(slow_timeout_s + 3)
                async with asyncio.timeout(60):
                    with contextlib.suppress(ConnectionClosed):
                        async for _ in stuck:
                            pass
                old_close = stuck.close_code
            await wait_until(lambda: server.log().count(f"stream closed uid={uid} ") == 2, 90, "both streams' ends")
            words = stored_words(server, uid)
            sent_words = sum(transcribed_words(c) for c in deepgram.connections)
        finally:
            stop_server(server)
    print(f"the reconnect was ready {ready_s:.2f} s after it connected (WS_SLOW_CLIENT_TIMEOUT_S {slow_timeout_s:.0f}"
          f" s); the stuck client closed {old_close}; {words} words stored of {sent_words} transcribed")
    assert ready_s < slow_timeout_s / 3
    assert old_close == 1008  # its sends were stuck from before it was replaced until the slow-client timeout
    assert words == sent_words > 0  # the replaced stream finished: every word it was sent is stored
    assert "Traceback" not in server.log()
