"""Requests with bodies against a real `uvicorn server:app` process, over raw sockets where the timing of the body
matters: a body over the limit is refused on its Content-Length before any is read, a chunked one is cut off past
the limit, an unauthenticated upload gets its 401 without the server waiting for the upload, `/v1/vad` needs a caller
when auth is configured, and uploaded playlists or concat scripts are refused without reading what they name."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import av
import httpx
import pytest
from conftest import SAMPLE_WAV, start_server, stop_server

ADMIN_KEY = "upl-admin-key-7c2e9f41b8d35a60e1f4"  # 32+ characters
INTERNAL_KEY = "upl-internal-key-0b9e27c4d1f8a365"
TIMEOUT = httpx.Timeout(60.0)
PROMPT_S = 5.0  # a refusal before the body comes within this (generous: 2 shared cores)
BOUNDARY = "----uploadtestboundary"


# --- raw HTTP -------------------------------------------------------------------------------------------------------


def multipart_head(field: str = "file", filename: str = "a.wav") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def request_head(port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict]:
    """(status, JSON body) of the first response on the socket; raises TimeoutError when none comes in time."""
    sock.settimeout(timeout_s)
    data = b""
    deadline = time.monotonic() + timeout_s
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return int(head.split()[1]), json.loads(body[:length])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete response in {timeout_s} s: {data[:200]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data[:200]!r}")
        data += chunk


def answer_before_the_body(port: int, path: str, headers: dict[str, str], declared: int) -> tuple[int, dict]:
    """Sends the headers with a Content-Length of `declared` bytes and only 1 kB of a multipart body, then waits
    PROMPT_S for the answer: a server that waits for the body answers nothing."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(declared),
                **headers}
        sock.sendall(request_head(port, path, head) + multipart_head() + bytes(1024))
        return read_response(sock, PROMPT_S)


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory) -> Iterator:
    """Loopback-only mode, MAX_UPLOAD_MB=1 and MAX_JSON_BODY_KB=16."""
    server = start_server(tmp_path_factory.mktemp("small"), MAX_UPLOAD_MB="1", MAX_JSON_BODY_KB="16")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator:
    """ADMIN_KEY and INTERNAL_API_KEY configured."""
    server = start_server(tmp_path_factory.mktemp("auth"), ADMIN_KEY=ADMIN_KEY, INTERNAL_API_KEY=INTERNAL_KEY)
    yield server
    stop_server(server)


# --- size: refused on Content-Length, cut off when chunked ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/vad", "/v1/speaker-identification", "/v1/speech-profile"])
def test_content_length_over_the_limit_is_413_before_the_body(small_limits, path):
    status, body = answer_before_the_body(small_limits.port, path, {"Authorization": "Bearer u1"}, 50 << 20)
    assert status == 413, body
    assert "1 MB" in body["detail"]
    assert httpx.get(f"{small_limits.http}/health").status_code == 200


def test_chunked_upload_is_cut_off_past_the_limit(small_limits):
    """No Content-Length: the server reads on, and answers 413 once past MAX_UPLOAD_MB (+1 MB of form) while the
    client is still sending; it never waits for (or spools) the rest. The body never even ends here: a server that
    reads the whole body first never answers. (What counts as sent includes the socket buffers, several MB.)"""
    port = small_limits.port
    head = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Transfer-Encoding": "chunked"}
    piece = bytes(64 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        first = multipart_head()
        sock.sendall(request_head(port, "/v1/vad", head) + f"{len(first):x}\r\n".encode() + first + b"\r\n")
        sent, answer = 0, None
        while sent < 64 << 20 and answer is None:
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            time.sleep(0.001)
            sock.settimeout(0.0)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    answer = read_response(sock, PROMPT_S)
            except BlockingIOError:
                pass
            sock.settimeout(None)
        if answer is None:  # all 64 MB sent and no answer yet: a last chance, still without ending the body
            answer = read_response(sock, PROMPT_S)
    status, body = answer
    assert status == 413, body
    assert sent < 24 << 20, f"answered only after {sent} bytes"


def test_json_body_over_its_limit_is_413(small_limits):
    """MAX_JSON_BODY_KB=16: a 32 kB person name is refused, by Content-Length and when chunked."""
    url = f"{small_limits.http}/v1/people"
    auth = {"Authorization": "Bearer u1", "Content-Type": "application/json"}
    big = json.dumps({"name": "x" * 32_000}).encode()
    r = httpx.post(url, content=big, headers=auth, timeout=TIMEOUT)
    assert r.status_code == 413, r.text
    assert "16 KB" in r.json()["detail"]
    r = httpx.post(url, content=iter([big[:10_000], big[10_000:]]), headers=auth, timeout=TIMEOUT)  # chunked
    assert r.status_code == 413, r.text
    r = httpx.post(url, json={"name": "Ann"}, headers={"Authorization": "Bearer u1"}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text


def test_uploads_within_the_limit_still_work(small_limits):
    """A 0.96 MB WAV under MAX_UPLOAD_MB=1, sent chunked (no Content-Length) and with one."""
    data = SAMPLE_WAV.read_bytes()
    r = httpx.post(f"{small_limits.http}/v1/vad", files={"file": ("s.wav", data)}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json(), r.text
    body = multipart_head() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    r = httpx.post(f"{small_limits.http}/v1/vad", content=iter([body[:300_000], body[300_000:]]),
                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json(), r.text


# --- a caller before the body ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/vad", "/v1/speaker-identification?uid=u1", "/v1/speech-profile",
                                  "/v1/people/p1/samples", "/v3/upload-audio"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-valid-token"])
def test_unauthenticated_upload_gets_401_without_sending_it(auth_server, path, authorization):
    """50 MB declared (under MAX_UPLOAD_MB), 1 kB sent: the 401 comes at once, not after the upload."""
    headers = {"Authorization": authorization} if authorization else {}
    status, body = answer_before_the_body(auth_server.port, path, headers, 50 << 20)
    assert status == 401, body
    assert isinstance(body["detail"], str) and body["detail"]


def test_vad_needs_a_caller_when_auth_is_configured(auth_server):
    url = f"{auth_server.http}/v1/vad"
    files = {"file": ("s.wav", SAMPLE_WAV.read_bytes())}
    r = httpx.post(url, files=files, timeout=TIMEOUT)
    assert r.status_code == 401, r.text
    assert r.json()["detail"]
    for headers in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}u1"},
                    {"X-Internal-Key": INTERNAL_KEY}):
        r = httpx.post(url, files=files, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 200, (headers.keys(), r.text)
        assert r.json() and r.json()[0]["start"] > 6.0
    r = httpx.post(url, files=files, headers={"X-Internal-Key": INTERNAL_KEY[:-1] + "x"}, timeout=TIMEOUT)
    assert r.status_code == 401


def test_vad_in_loopback_mode_needs_no_header_unless_proxied(small_limits):
    url = f"{small_limits.http}/v1/vad"
    files = {"file": ("s.wav", SAMPLE_WAV.read_bytes())}
    assert httpx.post(url, files=files, timeout=TIMEOUT).status_code == 200
    r = httpx.post(url, files=files, headers={"X-Forwarded-For": "203.0.113.9"}, timeout=TIMEOUT)
    assert r.status_code == 401, r.text


# --- playlists and scripts: refused, what they name never read ------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        data = SAMPLE_WAV.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def url_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that serves sample.wav at any path and records each request."""
    hits: list[str] = []
    handler = type("Recorder", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def hls_playlist(entry: str) -> bytes:
    return (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:30\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:30.0,\n{entry}\n"
            "#EXT-X-ENDLIST\n").encode()


def test_ffconcat_upload_is_refused_without_reading_the_named_file(tmp_path):
    """An ffconcat script naming a file next to the server (its working directory) was decoded as that file: the
    server answered with the speech regions of its own file. Now 415, and the absolute-path form too."""
    server = start_server(tmp_path)
    try:
        shutil.copy(SAMPLE_WAV, tmp_path / "secret.wav")  # in the server's working directory
        for script, name in ((b"ffconcat version 1.0\nfile secret.wav\n", "list.ffconcat"),
                             (b"ffconcat version 1.0\nfile /etc/hostname\n", "list.txt"),
                             (f"ffconcat version 1.0\nfile {tmp_path / 'secret.wav'}\n".encode(), "abs.ffconcat")):
            r = httpx.post(f"{server.http}/v1/vad", files={"file": (name, script)}, timeout=TIMEOUT)
            assert 400 <= r.status_code < 500, (script, r.status_code, r.text)
            assert isinstance(r.json()["detail"], str)
    finally:
        stop_server(server)


def test_hls_upload_is_refused_without_fetching_its_entries(local_server, url_server, tmp_path):
    base, hits = url_server
    for entry in (f"{base}/seg.wav", str(SAMPLE_WAV)):
        r = httpx.post(f"{local_server.http}/v1/vad", files={"file": ("list.m3u8", hls_playlist(entry),
                                                                      "application/vnd.apple.mpegurl")},
                       timeout=TIMEOUT)
        assert 400 <= r.status_code < 500, (entry, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str)
    assert hits == []


def test_decoder_refuses_a_playlist_ffmpeg_would_follow(url_server, tmp_path):
    """Opened from a file named .m3u8, FFmpeg probes HLS and fetches the entries (checked here with PyAV unrestricted:
    the recording server sees the request); `iter_audio_chunks` refuses the demuxer before it opens anything."""
    from streaming.audiofile import AudioFileError, iter_audio_chunks

    base, hits = url_server
    playlist = tmp_path / "list.m3u8"
    playlist.write_bytes(hls_playlist(f"{base}/seg.wav"))
    with open(playlist, "rb") as f, pytest.raises(av.error.FFmpegError):
        av.open(f)  # it fetches the entry, then dislikes what came (a WAV where HLS wants .ts or .aac)
    assert hits == ["/seg.wav"], "FFmpeg did not follow the playlist: this test would show nothing"
    hits.clear()
    with open(playlist, "rb") as f, pytest.raises(AudioFileError) as err:
        next(iter_audio_chunks(f, 3600))
    assert err.value.status == 415
    assert hits == []
