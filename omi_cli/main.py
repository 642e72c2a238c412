"""`omi-server` commands: serve, stream, vad, identify, enrol. Each prints what a shell user reads or pipes on,
sends errors to stderr, and exits with a code from `omi_cli.errors` (listed in `--help`)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from omi_cli import api
from omi_cli.errors import BAD_INPUT, EXIT_CODES_HELP, FAILED, OK, CliError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN = "cli-user"  # the uid a loopback-only server (no ADMIN_KEY, no Firebase) takes from `Bearer <uid>`


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("OMI_URL", DEFAULT_URL),
                   help=f"the server's base URL (env OMI_URL; default {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("OMI_TOKEN", DEFAULT_TOKEN),
                   help="sent as 'Authorization: Bearer <token>': a Firebase ID token, ADMIN_KEY followed by the uid, "
                        f"or on a loopback-only server the uid itself (env OMI_TOKEN; default {DEFAULT_TOKEN!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omi-server", description="The Omi unified audio server and its command-line client.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (the same as `make run`)", epilog=EXIT_CODES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run the server with uvicorn. Settings come from the environment and "
                                            "from ./.env (see .env.template).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--env-file", type=Path, default=None, help="load settings from this file first")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--proxy-headers", action="store_true",
                       help="behind a TLS proxy: trust X-Forwarded-Proto/For from --forwarded-allow-ips")
    serve.add_argument("--forwarded-allow-ips", default=None, help="the proxy's addresses (uvicorn's option)")

    stream = commands.add_parser(
        "stream", help="stream a file or the microphone to /v4/listen and show the live transcript",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream audio at real time (or --fast) to the server's /v4/listen and show the transcript as it "
                    "grows, with speaker labels. --out writes the final transcript (json, txt, srt, vtt or rttm, "
                    "by the file's suffix or --format).")
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, help="an audio file (WAV, FLAC, MP3, OGG, M4A, ...)")
    source.add_argument("--mic", action="store_true", help="the default microphone (PulseAudio or ALSA); Ctrl-C stops")
    stream.add_argument("--codec", choices=["pcm16", "opus"], default="pcm16", help="wire codec (default pcm16)")
    stream.add_argument("--language", default="en", help="language code, or multi (default en)")
    stream.add_argument("--fast", action="store_true", help="send as fast as the server takes it, not at real time")
    stream.add_argument("--out", type=Path, help="write the final transcript here ('-' for stdout)")
    stream.add_argument("--format", choices=["json", "txt", "srt", "vtt", "rttm"],
                        help="format of --out (default: from its suffix, else json)")
    stream.add_argument("--plain", action="store_true", help="one line per segment update, even on a terminal")
    stream.add_argument("--max-wait", type=float, default=300.0,
                        help="after the audio, wait at most this long for the server's last segments (default 300 s)")
    _client_options(stream)

    vad = commands.add_parser("vad", help="the speech regions of a file (POST /v1/vad, or --local)",
                              epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Print the speech regions of an audio file as RTTM (default) or JSON.")
    vad.add_argument("file", type=Path)
    vad.add_argument("--json", action="store_true", help="print JSON [{start, end, duration}] instead of RTTM")
    vad.add_argument("--local", action="store_true",
                     help="run the server's VAD in this process (settings from the environment and .env) instead "
                          "of calling a server")
    _client_options(vad)

    identify = commands.add_parser(
        "identify", help="who speaks in each segment (POST /v1/speaker-identification)", epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print one {start, end, is_user, person_id} per segment as JSON lines, matched against the "
                    "token's user's voice profiles.")
    identify.add_argument("file", type=Path)
    identify.add_argument("--segments", required=True,
                          help="a JSON file of [{start, end}], an RTTM file, or inline '0-3.5,4.2-9'")
    identify.add_argument("--uid", help="whose profiles (admin key or internal callers only)")
    _client_options(identify)

    enrol = commands.add_parser(
        "enrol", help="upload a voice profile: yours (/v3/upload-audio) or a person's (--person)",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Enrol a voice from an audio file (any format: converted to 16 kHz WAV first). Without --person "
                    "it is the token's user's own voice (5-180 s); with --person NAME it adds a sample to that "
                    "person (created if new).")
    enrol.add_argument("file", type=Path)
    enrol.add_argument("--person", help="the person's name (2-40 characters)")
    _client_options(enrol)
    return parser


# --- commands -----------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.env_file is not None and not args.env_file.is_file():
        raise CliError(f"no such file: {args.env_file}", BAD_INPUT)
    # The same limit as `make run`: uvicorn would otherwise buffer 16 MiB WebSocket messages before the app sees them.
    uvicorn.run("server:app", host=args.host, port=args.port, ws_max_size=1048576, log_level=args.log_level,
                env_file=str(args.env_file) if args.env_file else None, proxy_headers=args.proxy_headers,
                forwarded_allow_ips=args.forwarded_allow_ips)
    return OK


def _output_format(out: Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    return suffix if suffix in ("json", "txt", "srt", "vtt", "rttm") else "json"


def cmd_stream(args: argparse.Namespace) -> int:
    from omi_cli import live
    from omi_cli.audio_in import load_file, microphone_frames
    from transcript_export import render

    plain = args.plain or not sys.stdout.isatty()
    if args.file is not None:
        audio = load_file(args.file)
        total_s = len(audio) / 16000
        view = live.PlainView(sys.stdout) if plain else live.RichView(args.file.name, total_s)
        run = live.stream_file(args.url, args.token, audio, codec=args.codec, language=args.language, fast=args.fast,
                               view=view, max_wait_s=args.max_wait)
        name = args.file.stem
    else:
        view = live.PlainView(sys.stdout) if plain else live.RichView("microphone", None)
        run = live.stream(args.url, args.token, live.encode_live(microphone_frames(), args.codec), codec=args.codec,
                          language=args.language, view=view, total_s=None, max_wait_s=args.max_wait)
        name = "microphone"
    try:
        outcome = asyncio.run(run)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return OK
    finally:
        view.close()
    code = live.finish(outcome)
    if args.out is not None:
        text = render(outcome.ordered(), _output_format(args.out, args.format), file_id=name)
        if str(args.out) == "-":
            sys.stdout.write(text)
        else:
            try:
                args.out.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    return code


def _rttm(regions: list[dict[str, float]], name: str) -> str:
    return "".join(f"SPEAKER {name} 1 {r['start']:.3f} {r['duration']:.3f} <NA> <NA> speech <NA> <NA>\n"
                   for r in regions)


def _local_vad(path: Path) -> list[dict[str, float]]:
    from config import Settings
    from streaming.audiofile import AudioFileError
    from streaming.file_vad import file_speech_regions
    from streaming.vad import load_vad_backend
    from streaming.vad_batch import BatchVadParams

    settings = Settings()
    backend = load_vad_backend(settings)
    try:
        with path.open("rb") as f:
            return file_speech_regions(backend, f, BatchVadParams.from_settings(settings),
                                       settings.max_upload_seconds)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", 6) from exc
    except AudioFileError as exc:
        raise CliError(f"{path}: {exc}", BAD_INPUT) from exc


def cmd_vad(args: argparse.Namespace) -> int:
    if args.local:
        regions = _local_vad(args.file)
    else:
        data = api.read_file(args.file)
        regions = api.request("POST", args.url, "/v1/vad", args.token, files={"file": (args.file.name, data)})
    sys.stdout.write(json.dumps(regions) + "\n" if args.json else _rttm(regions, args.file.stem))
    return OK


def parse_segments(spec: str) -> list[dict[str, float]]:
    """`--segments`: a JSON file (a list of {start, end, ...}), an RTTM file, or inline 'start-end,start-end'."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
                return [{"start": float(r["start"]), "end": float(r["end"])} for r in rows]
            except (ValueError, KeyError, TypeError) as exc:
                raise CliError(f"{path}: not a JSON list of {{start, end}}: {exc}", BAD_INPUT) from exc
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0] != "SPEAKER":
                continue
            try:
                start, duration = float(fields[3]), float(fields[4])
            except (IndexError, ValueError) as exc:
                raise CliError(f"{path}:{n}: not an RTTM SPEAKER line", BAD_INPUT) from exc
            out.append({"start": start, "end": start + duration})
        if not out:
            raise CliError(f"{path}: no segments (expected a JSON list or RTTM SPEAKER lines)", BAD_INPUT)
        return out
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            start, end = (float(x) for x in part.split("-", 1))
        except ValueError as exc:
            raise CliError(f"--segments: {part!r} is not 'start-end' (seconds), nor a file", BAD_INPUT) from exc
        out.append({"start": start, "end": end})
    if not out:
        raise CliError("--segments: no segments given", BAD_INPUT)
    return out


def cmd_identify(args: argparse.Namespace) -> int:
    segments = parse_segments(args.segments)
    data = api.read_file(args.file)
    params = {"uid": args.uid} if args.uid else None
    results = api.request("POST", args.url, "/v1/speaker-identification", args.token, params=params,
                          files={"audio_file": (args.file.name, data)}, data={"segments": json.dumps(segments)})
    for seg, result in zip(segments, results, strict=False):
        print(json.dumps(seg | result))
    return OK


def _as_wav16k(path: Path) -> bytes:
    """Any audio file as a 16 kHz mono 16-bit WAV: what /v3/upload-audio takes."""
    import soundfile

    from omi_cli.audio_in import load_file

    audio = load_file(path)
    buf = io.BytesIO()
    soundfile.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def cmd_enrol(args: argparse.Namespace) -> int:
    wav = _as_wav16k(args.file)
    if args.person is None:
        answer: Any = api.request("POST", args.url, "/v3/upload-audio", args.token,
                                  files={"file": (args.file.stem + ".wav", wav, "audio/wav")})
        print(json.dumps({"enrolled": "user"} | {k: v for k, v in answer.items() if k != "url"}))
        return OK
    person = api.request("POST", args.url, "/v1/users/people", args.token, json={"name": args.person})
    profile = api.request("POST", args.url, f"/v1/people/{person['id']}/samples", args.token,
                          files={"file": (args.file.stem + ".wav", wav, "audio/wav")})
    print(json.dumps({"enrolled": "person", "person_id": person["id"], "name": person["name"],
                      "samples": profile.get("samples")}))
    return OK


COMMANDS = {"serve": cmd_serve, "stream": cmd_stream, "vad": cmd_vad, "identify": cmd_identify, "enrol": cmd_enrol}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"omi-server {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return FAILED
