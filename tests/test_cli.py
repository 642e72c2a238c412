"""`omi-server` (omi_cli) against a real server process: each command run as a user runs it (a subprocess, its
stdout, stderr and exit code), on real speech.

The server is the embedded defaults (silero VAD, pocketsphinx STT, loopback-only auth), plus one with ADMIN_KEY for
the refusals. What each test would catch: a command that prints nothing or the wrong regions, a transcript that only
appears at the end, an exit code that hides a failure, a traceback instead of a message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile
from conftest import DATA, REPO, SAMPLE_WAV, start_server
from reference import annotations
from server_process import stop_server

CLI = [sys.executable, "-m", "omi_cli"]
ADMIN_KEY = "k" * 40


def run_cli(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYANNOTE_METRICS_ENABLED": "false", **(env or {})})


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("cli-admin"), ADMIN_KEY=ADMIN_KEY, STT_BACKEND="local")
    yield server
    stop_server(server)


def test_help_names_every_command_and_the_exit_codes():
    done = run_cli("--help")
    assert done.returncode == 0
    for command in ("serve", "stream", "vad", "identify", "enrol"):
        assert command in done.stdout
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "exit codes:" in sub.stdout, sub.stderr
    assert run_cli("stream").returncode == 2  # neither a file nor --mic


def test_stream_prints_the_transcript_as_it_grows_and_writes_srt(local_server, tmp_path):
    """At real time, lines appear while the file is still being sent, not only at the end; --out writes SRT whose
    cues are the segments the server sent, with two speakers' labels."""
    out = tmp_path / "sample.srt"
    started = time.monotonic()
    proc = subprocess.Popen([*CLI, "stream", str(SAMPLE_WAV), "--url", local_server.http, "--token", "cli-stream",
                             "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line_at = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if first_line_at is None:
            first_line_at = time.monotonic() - started
        lines.append(line.rstrip("\n"))
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=120) == 0, stderr
    assert first_line_at is not None, stderr
    # sample.wav lasts 30 s: a transcript shown only once the whole file was sent would come after 30 s.
    assert first_line_at < 28, f"first transcript line after {first_line_at:.1f} s"
    assert "Traceback" not in stderr
    words = " ".join(lines).split()
    assert len(words) > 20, lines
    srt = out.read_text()
    cues = [c for c in srt.strip().split("\n\n") if c]
    assert cues and all(" --> " in c.splitlines()[1] for c in cues), srt
    assert len({c.splitlines()[2].split(":")[0] for c in cues}) >= 2, srt  # two speakers labelled


def test_stream_fast_with_opus_writes_json_and_rttm(local_server, tmp_path):
    for suffix in ("json", "rttm"):
        out = tmp_path / f"t.{suffix}"
        done = run_cli("stream", str(SAMPLE_WAV), "--fast", "--codec", "opus", "--url", local_server.http,
                       "--token", f"cli-opus-{suffix}", "--out", str(out))
        assert done.returncode == 0, done.stderr
        if suffix == "json":
            segments = json.loads(out.read_text())["segments"]
            assert segments and all(s["end"] >= s["start"] for s in segments)
            assert sum(len(s["text"].split()) for s in segments) > 20
        else:
            rows = [line.split() for line in out.read_text().splitlines()]
            assert rows and all(r[0] == "SPEAKER" and float(r[4]) >= 0 for r in rows)


def test_vad_prints_the_servers_regions_as_rttm_json_and_locally(local_server):
    expected = httpx.post(f"{local_server.http}/v1/vad", files={"file": SAMPLE_WAV.open("rb")}, timeout=120).json()
    assert expected
    rttm = run_cli("vad", str(SAMPLE_WAV), "--url", local_server.http)
    assert rttm.returncode == 0, rttm.stderr
    rows = [line.split() for line in rttm.stdout.splitlines()]
    assert [(float(r[3]), round(float(r[3]) + float(r[4]), 3)) for r in rows] == pytest.approx(
        [(r["start"], r["end"]) for r in expected], abs=0.002)
    as_json = run_cli("vad", str(SAMPLE_WAV), "--json", "--url", local_server.http)
    assert json.loads(as_json.stdout) == expected
    local = run_cli("vad", str(SAMPLE_WAV), "--json", "--local")
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout) == expected  # the same VAD and parameters in process


def test_enrol_then_identify_finds_the_user(local_server, tmp_path):
    """Enrol speaker90 (sample.wav's first speaker) from its own turns, then ask about one turn of each speaker."""
    audio, rate = soundfile.read(SAMPLE_WAV, dtype="float32")
    reference = annotations(DATA / "sample.rttm")["sample"]
    overlap = reference.get_overlap()
    # Each speaker's speech where nobody else speaks: an overlapped turn would carry the other voice.
    by_speaker = {who: [(seg.start, seg.end) for seg in reference.label_timeline(who).extrude(overlap)
                        if seg.duration > 0.5] for who in reference.labels()}
    speakers = sorted(by_speaker, key=lambda k: -sum(e - s for s, e in by_speaker[k]))
    user = speakers[0]
    enrol_clip = np.concatenate([audio[int(s * rate) : int(e * rate)] for s, e in by_speaker[user]])
    enrol_path = tmp_path / "me.flac"  # not a WAV: the CLI converts it for /v3/upload-audio
    soundfile.write(enrol_path, enrol_clip, rate)
    token = "cli-enrol"
    done = run_cli("enrol", str(enrol_path), "--url", local_server.http, "--token", token)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enrolled"] == "user"
    mine = max(by_speaker[user], key=lambda t: t[1] - t[0])
    other = max(by_speaker[speakers[1]], key=lambda t: t[1] - t[0])
    spec = f"{mine[0]}-{mine[1]},{other[0]}-{other[1]}"
    done = run_cli("identify", str(SAMPLE_WAV), "--segments", spec, "--url", local_server.http, "--token", token)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["is_user"] for r in rows] == [True, False], rows
    # A person's samples (two different halves of the voice: the same clip twice adds nothing new): created by
    # name, then the second call adds to the same person.
    halves = []
    for i, half in enumerate((enrol_clip[: len(enrol_clip) // 2], enrol_clip[len(enrol_clip) // 2 :])):
        halves.append(tmp_path / f"half{i}.wav")
        soundfile.write(halves[-1], half, rate)
    first = run_cli("enrol", str(halves[0]), "--person", "Ada Lovelace", "--url", local_server.http,
                    "--token", token)
    second = run_cli("enrol", str(halves[1]), "--person", "Ada Lovelace", "--url", local_server.http,
                     "--token", token)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["person_id"] == b["person_id"] and b["samples"] > a["samples"]


def test_errors_are_messages_with_exit_codes(local_server, admin_server, tmp_path):
    missing = run_cli("vad", str(tmp_path / "nope.wav"), "--url", local_server.http)
    assert missing.returncode == 6 and "cannot read" in missing.stderr
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio " * 100)
    bad = run_cli("vad", str(not_audio), "--url", local_server.http)
    assert bad.returncode == 5 and bad.stderr.strip(), bad.stderr
    nobody = run_cli("vad", str(SAMPLE_WAV), "--url", "http://127.0.0.1:9")
    assert nobody.returncode == 3 and "no server answers" in nobody.stderr
    refused = run_cli("vad", str(SAMPLE_WAV), "--url", admin_server.http, "--token", "not-the-key")
    assert refused.returncode == 4, refused.stderr
    refused_stream = run_cli("stream", str(SAMPLE_WAV), "--fast", "--url", admin_server.http, "--token", "wrong")
    assert refused_stream.returncode == 4 and "--token" in refused_stream.stderr
    allowed = run_cli("stream", str(SAMPLE_WAV), "--fast", "--url", admin_server.http, "--token", ADMIN_KEY + "u1")
    assert allowed.returncode == 0 and allowed.stdout.strip(), allowed.stderr
    bad_segments = run_cli("identify", str(SAMPLE_WAV), "--segments", "one-two", "--url", local_server.http)
    assert bad_segments.returncode == 5 and "start-end" in bad_segments.stderr
    for done in (missing, bad, nobody, refused, refused_stream, bad_segments):
        assert "Traceback" not in done.stderr
