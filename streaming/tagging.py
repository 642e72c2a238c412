"""Live speaker tagging for one connection: who said each word of a final transcript.

The audio sent to STT is kept in a ring buffer indexed by sent-audio sample, the same clock STT word times use, so
a word's audio is one slice away. Each final transcript's span is cut into overlapping windows, embedded on the
shared model pool (batched with every other connection's windows), and each window is either matched to the
conversation's clusters or starts a new one. Words take the label of the window nearest to them. A cluster is
identified as the user or an enrolled person once it has enough evidence (`speaker.MatchRules`).

All state here belongs to one connection's `Pipeline`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from streaming.speaker import SAMPLE_RATE, MatchRules, OnlineClusters, ProfileIndex
from streaming.stt import Word

log = logging.getLogger(__name__)

WINDOW_S = 1.5  # one embedding per 1.5 s: long enough for a stable voice print, short enough to catch turns
HOP_S = 0.75  # half-overlapping windows, so a turn change is never more than ~0.4 s from a window centre
MIN_WINDOW_S = 0.8  # shorter spans are not embedded: they borrow the label of the speaker just before
RING_S = 90.0  # sent audio kept for embedding; STT results arrive well within this (local STT: region + decode)


class AudioRing:
    """The last RING_S seconds of sent audio as int16, addressed by absolute sent-sample index. Allocated on the
    first speech, so an idle stream costs nothing."""

    def __init__(self, seconds: float = RING_S) -> None:
        self.capacity = int(seconds * SAMPLE_RATE)
        self._buf: np.ndarray | None = None
        self.end = 0  # absolute index one past the newest sample

    def append(self, audio: np.ndarray) -> None:
        if self._buf is None:
            self._buf = np.zeros(self.capacity, np.int16)
        pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)[-self.capacity :]
        start = (self.end + len(audio) - len(pcm)) % self.capacity
        first = min(len(pcm), self.capacity - start)
        self._buf[start : start + first] = pcm[:first]
        self._buf[: len(pcm) - first] = pcm[first:]
        self.end += len(audio)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """float32 audio of absolute sent samples [start, stop), clipped to what is still held."""
        start, stop = max(start, self.end - self.capacity, 0), min(stop, self.end)
        if self._buf is None or stop <= start:
            return np.zeros(0, np.float32)
        idx = np.arange(start, stop) % self.capacity
        return self._buf[idx].astype(np.float32) / 32768.0


@dataclass(frozen=True)
class SpeakerLabel:
    speaker_id: int
    is_user: bool = False
    person_id: str | None = None

    @property
    def speaker(self) -> str:
        return f"SPEAKER_{self.speaker_id}"


@dataclass
class _ClusterIdentity:
    is_user: bool = False
    person_id: str | None = None
    assigned: bool = False  # set by the client (speaker_assigned): never overridden by matching


class SpeakerTagger:
    """Per-connection. `label_words` is awaited in transcript order by the pipeline."""

    def __init__(self, pool, profiles: ProfileIndex, rules: MatchRules, cluster_threshold: float) -> None:
        self._pool = pool
        self.profiles = profiles
        self.rules = rules
        self.ring = AudioRing()
        self.clusters = OnlineClusters(cluster_threshold)
        self._identity: dict[int, _ClusterIdentity] = {}
        self._last: tuple[float, int] | None = None  # (sent-time end, cluster) of the last labelled window

    def add_audio(self, audio: np.ndarray) -> None:
        self.ring.append(audio)

    def label(self, cluster: int) -> SpeakerLabel:
        ident = self._identity.get(cluster, _ClusterIdentity())
        return SpeakerLabel(cluster, ident.is_user, ident.person_id)

    async def label_words(self, words: list[Word]) -> tuple[list[SpeakerLabel], set[int]]:
        """Labels for words (times in sent-audio seconds), and the clusters whose identity changed (their earlier
        segments need re-sending)."""
        if not words:
            return [], set()
        span = (words[0].start, words[-1].end)
        windows = plan_windows(*span)
        clips = [self.ring.slice(round(a * SAMPLE_RATE), round(b * SAMPLE_RATE)) for a, b in windows]
        keep = [i for i, c in enumerate(clips) if len(c) >= MIN_WINDOW_S * SAMPLE_RATE]
        if not keep:
            cluster = self._borrow()
            return [self.label(cluster)] * len(words), set()
        embeddings = await self._pool.embed_many([clips[i] for i in keep])
        centres, labels = [], []
        for i, emb in zip(keep, embeddings, strict=True):
            a, b = windows[i]
            labels.append(self.clusters.assign(emb, seconds=b - a))
            centres.append((a + b) / 2)
        self._last = (windows[keep[-1]][1], labels[-1])
        centres_arr = np.array(centres)
        word_labels = [labels[int(np.argmin(np.abs(centres_arr - (w.start + w.end) / 2)))] for w in words]
        changed = {c for c in set(labels) if self._identify(c)}
        return [self.label(c) for c in word_labels], changed

    def _borrow(self) -> int:
        """Too short to embed: most short utterances ("yeah", "okay") continue or answer the last speaker; the
        latest one is the best guess, and a new cluster is not started on too little evidence."""
        return self._last[1] if self._last is not None else self.clusters.assign_empty()

    def _identify(self, cluster: int) -> bool:
        """Match a cluster with enough evidence against the enrolled profiles. True if its identity changed."""
        ident = self._identity.setdefault(cluster, _ClusterIdentity())
        if ident.assigned or not len(self.profiles):
            return False
        centroid, seconds = self.clusters.centroid(cluster), self.clusters.seconds[cluster]
        match = self.profiles.match(centroid, seconds, self.rules)
        is_user = match is not None and match.kind == "user"
        person_id = match.profile_id if match is not None and match.kind == "person" else None
        if (is_user, person_id) == (ident.is_user, ident.person_id):
            return False
        ident.is_user, ident.person_id = is_user, person_id
        return True

    def assign(self, cluster: int, person_id: str) -> np.ndarray:
        """The client says this cluster is `person_id`: fixed for the rest of the conversation. Returns the
        cluster's window embeddings so the caller can add them to that person's profile."""
        self._identity[cluster] = _ClusterIdentity(is_user=False, person_id=person_id, assigned=True)
        return self.clusters.members(cluster)


def plan_windows(start: float, end: float) -> list[tuple[float, float]]:
    """Half-overlapping WINDOW_S windows covering [start, end] (seconds); the last one ends at `end`. A span shorter
    than a window is one window."""
    if end - start <= WINDOW_S:
        return [(start, end)]
    starts = list(np.arange(start, end - WINDOW_S, HOP_S)) + [end - WINDOW_S]
    return [(float(s), float(s) + WINDOW_S) for s in starts]
