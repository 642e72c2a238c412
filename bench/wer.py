"""Word error rate and real-time factor of each STT backend available here, on speech with known text.

    .venv/bin/python bench/wer.py                                   # local (pocketsphinx)
    .venv/bin/python bench/wer.py --whisper-model DIR_OR_HF_ID      # + whisper (faster-whisper in process)
    .venv/bin/python bench/wer.py --openai-url http://host:8000/v1  # + openai (an OpenAI-compatible server)

Two sets, each utterance decoded as one speech region (as the server sends a closed region):
- `espeak`: the SENTENCES below rendered by espeak-ng (en-us, 160 words a minute, 16 kHz) with a white noise floor
  (`--noise-floor`, RMS 0.003, about -50 dBFS, fixed seed): espeak's pauses are digital zeros, which no microphone
  gives and which throw pocketsphinx's noise and cepstral-mean estimates off (WER 0.89 without the floor, 0.57 with
  it). Synthetic speech: not a figure for real users. Needs the `espeak-ng` program (Debian:
  `apt-get install espeak-ng`).
- `sample`: the real recording that pyannote.audio ships (pyannote/audio/sample/sample.wav, the same file as
  /work/shared/data/sample.wav) cut at the turns of its transcript sample.stm: 13 turns, 23 s of two people on a
  telephone line.

WER is jiwer's over the whole set (lower case, punctuation removed, whitespace collapsed on both sides); RTF is the
backend's processing time over the audio's duration (single process, this machine's cores). The whisper backend
decodes each set as batches of WHISPER_BATCH_SIZE regions, as the server's worker does under load; `--whisper-single`
adds its one-region-at-a-time figure. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming.stt import SAMPLE_RATE, to_pcm16  # noqa: E402

SENTENCES = (
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
    "the box was thrown beside the parked truck",
    "the hogs were fed chopped corn and garbage",
    "four hours of steady work faced us",
    "a large size in stockings is hard to sell",
    "the boy was there when the sun rose",
    "a rod is used to catch pink salmon",
    "the source of the huge river is the clear spring",
    "kick the ball straight and follow through",
    "help the woman get back to her feet",
    "a pot of tea helps to pass the evening",
    "smoky fires lack flame and heat",
    "the soft cushion broke the man's fall",
    "the salt breeze came across from the sea",
    "the girl at the booth sold fifty bonds",
)


@dataclass(frozen=True)
class Utterance:
    audio: np.ndarray  # float32, 16 kHz mono
    text: str


def espeak_set(noise_floor: float, voice: str = "en-us", words_per_minute: int = 160) -> list[Utterance]:
    """The SENTENCES through espeak-ng, resampled to 16 kHz, plus white noise of RMS `noise_floor`."""
    import soxr

    rng = np.random.default_rng(0)
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text], check=True)
            audio, rate = sf.read(path, dtype="float32")
            audio = soxr.resample(audio, rate, SAMPLE_RATE)
            audio = audio + rng.normal(0.0, noise_floor, len(audio)) if noise_floor else audio
            out.append(Utterance(audio.astype(np.float32), text))
    return out


def sample_set() -> list[Utterance]:
    """pyannote.audio's sample recording, cut at the turns of its STM transcript."""
    spec = importlib.util.find_spec("pyannote.audio")
    if spec is None or spec.submodule_search_locations is None:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "sample"
    audio, rate = sf.read(folder / "sample.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    out = []
    for line in (folder / "sample.stm").read_text(encoding="utf-8").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = float(fields[3]), float(fields[4])
            out.append(Utterance(audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)], fields[5]))
    return out


# --- backends: each takes a set's audio and returns one text per utterance ---------------------------------------

Transcribe = Callable[[list[np.ndarray]], list[str]]


def local_backend() -> Transcribe:
    from streaming.stt_local import LocalRecognizer

    recognizer = LocalRecognizer(decoders=1)

    def run(audios: list[np.ndarray]) -> list[str]:
        return [" ".join(w.text for w in recognizer.recognize(to_pcm16(a))) for a in audios]

    return run


def whisper_backend(model: str, batch_size: int | None) -> Transcribe:
    """batch_size None: WHISPER_BATCH_SIZE regions per model call; 1: one region at a time."""
    from config import Settings
    from streaming.stt_whisper import CHUNK_S, RegionItem, WhisperRecognizer

    settings = Settings(_env_file=None, stt_backend="whisper", whisper_model=model)
    recognizer = WhisperRecognizer(settings)
    size = batch_size or settings.whisper_batch_size

    def run(audios: list[np.ndarray]) -> list[str]:
        assert all(len(a) <= CHUNK_S * SAMPLE_RATE for a in audios)
        texts = []
        for i in range(0, len(audios), size):
            for words in recognizer.transcribe_batch([RegionItem(a, "en") for a in audios[i : i + size]]):
                texts.append(" ".join(w.text for w in words))
        return texts

    return run


def openai_backend(url: str, model: str, api_key: str | None) -> Transcribe:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def run(audios: list[np.ndarray]) -> list[str]:
        texts = []
        with httpx.Client(timeout=120.0, headers=headers) as client:
            for audio in audios:
                wav = io.BytesIO()
                sf.write(wav, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
                response = client.post(f"{url.rstrip('/')}/audio/transcriptions",
                                       files={"file": ("region.wav", wav.getvalue(), "audio/wav")},
                                       data={"model": model, "language": "en", "response_format": "json"})
                response.raise_for_status()
                texts.append(response.json().get("text", ""))
        return texts

    return run


# --- scoring ------------------------------------------------------------------------------------------------------


def word_error_rate(references: list[str], hypotheses: list[str]) -> tuple[float, int]:
    """jiwer's WER over the set with the same normalisation on both sides; also the reference's word count."""
    import jiwer

    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    # an empty hypothesis is a valid answer (every word deleted): jiwer needs a non-empty string, so a space
    hyps = [h if h.strip() else " " for h in hypotheses]
    wer = jiwer.wer(references, hyps, reference_transform=norm, hypothesis_transform=norm)
    return float(wer), sum(len(r.split()) for r in references)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--whisper-model", help="WHISPER_MODEL: a CTranslate2 Whisper directory or Hugging Face id")
    parser.add_argument("--whisper-single", action="store_true", help="also whisper one region per model call")
    parser.add_argument("--openai-url", help="an OpenAI-compatible base URL with /v1")
    parser.add_argument("--openai-model", default="whisper-1")
    parser.add_argument("--noise-floor", type=float, default=0.003, help="RMS of the espeak set's noise; 0: none")
    parser.add_argument("--sets", default="espeak,sample", help="comma-separated: espeak, sample")
    parser.add_argument("--show", action="store_true", help="print every reference and hypothesis")
    args = parser.parse_args()

    sets = {}
    if "espeak" in args.sets:
        sets["espeak"] = espeak_set(args.noise_floor)
    if "sample" in args.sets:
        sets["sample"] = sample_set()
    backends: dict[str, Transcribe] = {"local (pocketsphinx)": local_backend()}
    if args.whisper_model:
        backends[f"whisper ({args.whisper_model}, batched)"] = whisper_backend(args.whisper_model, None)
        if args.whisper_single:
            backends[f"whisper ({args.whisper_model}, one at a time)"] = whisper_backend(args.whisper_model, 1)
    if args.openai_url:
        backends[f"openai ({args.openai_model})"] = openai_backend(args.openai_url, args.openai_model,
                                                                  os.environ.get("OPENAI_STT_API_KEY"))

    print(f"{'backend':<48} {'set':<7} {'utts':>4} {'words':>5} {'audio s':>7} {'WER':>6} {'RTF':>6}")
    for name, run in backends.items():
        for set_name, utterances in sets.items():
            if not utterances:
                continue
            audios = [u.audio for u in utterances]
            run(audios[:1])  # warm-up: first-call allocations are not the backend's speed
            started = time.perf_counter()
            hypotheses = run(audios)
            elapsed = time.perf_counter() - started
            duration = sum(len(a) for a in audios) / SAMPLE_RATE
            wer, words = word_error_rate([u.text for u in utterances], hypotheses)
            print(f"{name:<48} {set_name:<7} {len(audios):>4} {words:>5} {duration:>7.1f} {wer:>6.3f} "
                  f"{elapsed / duration:>6.3f}", flush=True)
            if args.show:
                for u, h in zip(utterances, hypotheses, strict=True):
                    print(f"    ref: {u.text}\n    hyp: {h}")


if __name__ == "__main__":
    main()
