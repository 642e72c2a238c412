"""Live speaker tagging for one connection: who said each word of a final transcript.

The audio sent to STT is kept in a ring buffer indexed by sent-audio sample, the same clock STT word times use, so
a word's audio is one slice away. Each final transcript's span is cut into overlapping windows, embedded on the
shared model pool (batched with every other connection's windows), and each window is either matched to the
conversation's clusters or starts a new one. Words take the label of the window nearest to them. A cluster is
identified as the user or an enrolled person once it has enough evidence (`speaker.MatchRules`).

All state here belongs to one connection's `Pipeline`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from streaming.speaker import (
    CLUSTER_ASSIGN_THRESHOLD,
    CLUSTER_MERGE_THRESHOLD,
    SAMPLE_RATE,
    MatchRules,
    OnlineClusters,
    ProfileIndex,
)
from streaming.stt import Word

log = logging.getLogger(__name__)

# Windows on a fixed grid of sent audio. Chosen with bench/speaker_calibration.py over sample.wav and the AMI
# excerpts (live simulation: VAD, sent audio, online clustering): 1.2 s / 0.4 s gave mean agreement 0.90, against
# 0.90 for 1.5/0.75 (but 0.58 on sample.wav, whose turns last 0.4-4 s) and 0.87 for 2.0/0.5.
WINDOW_S = 1.2  # long enough for a usable voice print (resemblyzer needs ~0.75 s), short enough for quick turns
HOP_S = 0.4  # a turn change is never more than 0.2 s from a window centre
MIN_WINDOW_S = 0.8  # shorter spans are not embedded: they borrow the label of the speaker just before
RING_S = 90.0  # sent audio kept for embedding; STT results arrive well within this (local STT: region + decode)


class AudioRing:
    """The last RING_S seconds of sent audio as int16, addressed by absolute sent-sample index. Allocated on the
    first speech, so an idle stream costs nothing."""

    def __init__(self, seconds: float = RING_S) -> None:
        self.capacity = int(seconds * SAMPLE_RATE)
        self._buf: np.ndarray | None = None
        self.end = 0  # absolute index one past the newest sample

    def append(self, pcm16: np.ndarray) -> None:
        """int16 samples (`stt.to_int16`), the next ones of the sent audio."""
        if self._buf is None:
            self._buf = np.zeros(self.capacity, np.int16)
        pcm = pcm16[-self.capacity :]
        start = (self.end + len(pcm16) - len(pcm)) % self.capacity
        first = min(len(pcm), self.capacity - start)
        self._buf[start : start + first] = pcm[:first]
        self._buf[: len(pcm) - first] = pcm[first:]
        self.end += len(pcm16)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """float32 audio of absolute sent samples [start, stop), clipped to what is still held."""
        start, stop = max(start, self.end - self.capacity, 0), min(stop, self.end)
        if self._buf is None or stop <= start:
            return np.zeros(0, np.float32)
        a, b = start % self.capacity, stop % self.capacity
        pcm = self._buf[a:b] if a < b else np.concatenate((self._buf[a:], self._buf[:b]))  # wrapped round the end
        return pcm.astype(np.float32) / 32768.0


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

    def __init__(self, pool, profiles: ProfileIndex, rules: MatchRules,
                 assign_threshold: float = CLUSTER_ASSIGN_THRESHOLD,
                 merge_threshold: float = CLUSTER_MERGE_THRESHOLD) -> None:
        self._pool = pool
        self.profiles = profiles
        self.rules = rules
        self.ring = AudioRing()
        self.clusters = OnlineClusters(assign_threshold, merge_threshold)
        self._identity: dict[int, _ClusterIdentity] = {}
        self._last: int | None = None  # cluster of the last embedded window
        self._windows: dict[int, int] = {}  # window index on the sent-audio grid → cluster it joined

    def add_audio(self, pcm16: np.ndarray) -> None:
        self.ring.append(pcm16)

    def label(self, cluster: int) -> SpeakerLabel:
        cluster = self.clusters.resolve(cluster)
        ident = self._identity.get(cluster, _ClusterIdentity())
        return SpeakerLabel(cluster, ident.is_user, ident.person_id)

    async def label_words(self, words: list[Word]) -> tuple[list[SpeakerLabel], dict[int, SpeakerLabel]]:
        """Labels for words (times in sent-audio seconds), and relabels for earlier segments: speaker_id → its
        label now (a cluster merged into another, or a cluster identified as the user or a person)."""
        if not words:
            return [], {}
        start, end = words[0].start, words[-1].end
        new = [k for k in window_indices(start, end, self.ring.end / SAMPLE_RATE) if k not in self._windows]
        clips = [self.ring.slice(round(k * HOP_S * SAMPLE_RATE), round((k * HOP_S + WINDOW_S) * SAMPLE_RATE))
                 for k in new]
        new = [k for k, c in zip(new, clips, strict=True) if len(c) >= MIN_WINDOW_S * SAMPLE_RATE]
        clips = [c for c in clips if len(c) >= MIN_WINDOW_S * SAMPLE_RATE]
        if clips:
            for k, emb, clip in zip(new, await self._pool.embed_many(clips), clips, strict=True):
                self._windows[k] = self.clusters.assign(emb, seconds=len(clip) / SAMPLE_RATE)
            self._last = self._windows[max(new)]
        near = sorted(k for k in self._windows if start - WINDOW_S <= k * HOP_S <= end)
        if not near:
            # Too short to embed: most short utterances ("yeah", "okay") continue or answer the last speaker; the
            # latest one is the best guess, and no cluster is started on so little evidence.
            return [self.label(self._last if self._last is not None else 0)] * len(words), {}
        centres = np.array([k * HOP_S + WINDOW_S / 2 for k in near])
        word_clusters = [self._windows[near[int(np.argmin(np.abs(centres - (w.start + w.end) / 2)))]] for w in words]
        relabels = {}
        for gone, keep_id in self.clusters.drain_merges():
            keep = self.clusters.resolve(keep_id)
            kept, tagged = self._identity.get(keep), self._identity.get(gone)
            if tagged is not None and tagged.assigned and not (kept is not None and kept.assigned):
                self._identity[keep] = tagged  # the user's tag outlives the merge
            relabels[gone] = self.label(keep_id)
        for c in {self.clusters.resolve(self._windows[k]) for k in near}:
            if self._identify(c):
                relabels[c] = self.label(c)
        return [self.label(c) for c in word_clusters], relabels

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

    def export_state(self) -> bytes:
        """The conversation's clusters and identities, to store with the conversation."""
        arrays = self.clusters.to_arrays()
        ids = sorted(self._identity)
        arrays["identity_clusters"] = np.array(ids, np.int64)
        arrays["identity_flags"] = np.array([[self._identity[i].is_user, self._identity[i].assigned] for i in ids],
                                            bool).reshape(-1, 2)
        arrays["identity_people"] = np.array([self._identity[i].person_id or "" for i in ids], dtype=np.str_)
        arrays["last"] = np.array([-1 if self._last is None else self._last], np.int64)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    def import_state(self, state: bytes) -> None:
        """Continue a conversation: its speakers keep their labels. Windows restart (a new stream's audio)."""
        with np.load(io.BytesIO(state), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        self.clusters = OnlineClusters.from_arrays(arrays, self.clusters.assign_threshold,
                                                   self.clusters.merge_threshold)
        self._identity = {
            int(c): _ClusterIdentity(bool(flags[0]), str(person) or None, bool(flags[1]))
            for c, flags, person in zip(arrays["identity_clusters"], arrays["identity_flags"],
                                        arrays["identity_people"], strict=True)
        }
        last = int(arrays["last"][0])
        self._last = None if last < 0 else last

    def assign(self, cluster: int, person_id: str | None, is_user: bool = False) -> np.ndarray:
        """The client says this cluster is the user or `person_id`: fixed for the rest of the conversation (also
        when it merges into a cluster nobody tagged). Returns the cluster's window embeddings so the caller can add
        them to that profile."""
        if not 0 <= cluster < self.clusters.created:
            raise ValueError(f"no speaker_id {cluster} in this conversation")
        cluster = self.clusters.resolve(cluster)
        self._identity[cluster] = _ClusterIdentity(is_user=is_user, person_id=None if is_user else person_id,
                                                   assigned=True)
        return self.clusters.members(cluster)


def window_indices(start: float, end: float, available: float) -> list[int]:
    """The windows of the fixed sent-audio grid (window k spans [k*HOP_S, k*HOP_S + WINDOW_S]) whose centres fall
    near [start, end] (seconds), among those whose audio has fully arrived (`available` seconds sent so far).

    A fixed grid, not windows cut per transcript: STT results come in pieces of any length (Deepgram: ~1 s), and
    every word still gets a full-length window around it, each window embedded once."""
    first = max(0, int(np.floor((start - WINDOW_S / 2) / HOP_S)))
    last = int(np.ceil((end - WINDOW_S / 2) / HOP_S))
    complete = int(np.floor((available - WINDOW_S) / HOP_S))
    return list(range(first, min(last, complete) + 1))
