"""Issue 14 end to end on a real server process with the real resemblyzer embedder: the user enrols through
/v3/upload-audio with one AMI excerpt's speech, then /v1/speaker-identification is asked about 1-5 s turns of
another excerpt of the same speaker and of strangers. Plus the pure decision rule's constants."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AMI, start_server, stop_server
from deepgram_server import ThreadedDeepgramTestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.speaker_id_data import rttm_turns, single_speaker, turn_pieces  # noqa: E402
from streaming.profile_match import MATCH_RULES, decide, load_cohort  # noqa: E402

SR = 16000
USER = "FEE083"  # speaks in trn06 (enrolment, 21 s alone) and trn09 (the turns asked about)


def wav_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def excerpt(name: str) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The excerpt's audio and its single-speaker stretches."""
    audio, sr = sf.read(AMI / f"{name}.wav", dtype="float32")
    assert sr == SR
    return audio, single_speaker(rttm_turns(AMI / "train.rttm", name), 0.0, len(audio) / SR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadedDeepgramTestServer(api_key="dg-key", word_s=0.25) as deepgram:
        proc = start_server(tmp_path_factory.mktemp("identify"), STT_BACKEND="deepgram", DEEPGRAM_URL=deepgram.url,
                            DEEPGRAM_API_KEY="dg-key")
        yield proc
        stop_server(proc)


def identify(http: httpx.Client, name: str) -> list[tuple[float, float, str, bool]]:
    """(start, end, speaker, is_user) for every 1-5 s single-speaker piece of excerpt `name`."""
    audio, stretches = excerpt(name)
    pieces = turn_pieces(stretches)
    r = http.post("/v1/speaker-identification", files={"audio_file": (f"{name}.wav", wav_bytes(audio), "audio/wav")},
                  data={"segments": json.dumps([{"start": a, "end": b, "text": "x"} for a, b, _ in pieces])})
    assert r.status_code == 200, r.text
    return [(a, b, spk, ans["is_user"]) for (a, b, spk), ans in zip(pieces, r.json(), strict=True)]


def test_user_enrolled_from_one_excerpt_is_found_in_short_turns_of_another(server):
    audio, stretches = excerpt("trn06")
    speech = np.concatenate([audio[int(a * SR) : int(b * SR)] for a, b, spk in stretches if spk == USER])
    with httpx.Client(base_url=server.http, headers={"Authorization": "Bearer id-user"}, timeout=120) as http:
        r = http.post("/v3/upload-audio", files={"file": ("me.wav", wav_bytes(speech), "audio/wav")})
        assert r.status_code == 200, r.text
        own = identify(http, "trn09")
        strangers = identify(http, "trn07") + identify(http, "trn08")
    for a, b, spk, is_user in own + strangers:
        print(f"{a:6.2f}-{b:6.2f} {spk}: {'USER' if is_user else '-'}")
    mine = [t for t in own if t[2] == USER]
    others = [t for t in own if t[2] != USER] + strangers
    recall = sum(t[3] for t in mine) / len(mine)
    print(f"recall {recall:.2f} over {len(mine)} turns of the user; {sum(t[3] for t in others)} of {len(others)} "
          "other people's turns taken for the user")
    # Strangers only from trn07/trn08: the server's cohort is made of trn01-05 and sample.wav, and asking about audio
    # whose own embedding is in the cohort would flatter the rejection. Few trials: a floor, not a figure.
    assert len(mine) >= 8 and len(others) >= 6
    # Cosine >= 0.80 from 1.5 s of speech finds 5 of these 8 turns (bench/speaker_id_eval.py; answering 1-1.5 s
    # turns found a 6th but named an overlapped trn08 turn wrongly, see streaming/profile_match.py). A do-nothing
    # identifier scores 0.
    assert recall >= 0.6, own
    # One stranger's turn (FEE088, 1.5 s, cosine 0.802) passes the old rule and this one alike; no more may.
    assert sum(t[3] for t in others) <= 1, "nobody else is taken for the user"


def test_decision_rule_constants():
    """The shipped cohort belongs to resemblyzer only; the decision needs speech, the threshold and the margin."""
    assert load_cohort("resemblyzer") is not None and load_cohort("speechbrain:x") is None
    rules = MATCH_RULES
    accept = rules.normalised.accept
    assert decide(accept, -np.inf, rules.min_seconds, rules, normalised=True)
    assert not decide(accept, -np.inf, rules.min_seconds - 0.01, rules, normalised=True)  # too little speech
    assert not decide(accept - 0.01, -np.inf, 3.0, rules, normalised=True)
    assert not decide(accept + 1, accept + 1 - rules.normalised.margin / 2, 3.0, rules, normalised=True)  # a tie
    assert decide(rules.cosine.accept, -np.inf, 3.0, rules, normalised=False)
    assert not decide(rules.cosine.accept - 0.01, -np.inf, 3.0, rules, normalised=False)
