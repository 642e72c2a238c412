"""Speaker embeddings and the conversation's speakers: which embedding backend runs (`load_embedder`) and the
online clustering of a conversation's voices (`OnlineClusters`).

The backends live in `streaming.embedders` (the interface and Resemblyzer) and `streaming.speechbrain_embedder`;
matching against enrolled profiles in `streaming.profile_match`. Their public names are re-exported here, so
`from streaming.speaker import ...` keeps working.

Backends (`SPEAKER_BACKEND`: `resemblyzer`, the offline default, or `speechbrain`), their shapes, batching and
thread safety: see `streaming.embedders`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from config import Settings
from streaming.embedders import (  # noqa: F401 (re-exported)
    SAMPLE_RATE,
    ResemblyzerEmbedder,
    SpeakerEmbedder,
    cpu_native_bf16,
    resolve_speaker_precision,
)
from streaming.model_source import hub_cache_dir
from streaming.profile_match import MATCH_RULES, Match, MatchRules, ProfileIndex  # noqa: F401 (re-exported)
from streaming.speechbrain_embedder import SpeechBrainEmbedder, speechbrain_name  # noqa: F401 (re-exported)


def embedder_name(settings: Settings) -> str:
    """The `name` the embedder `load_embedder(settings)` makes will have, without loading it (LAZY_MODELS: profiles
    are matched by it before the first embedding)."""
    if settings.speaker_backend == "speechbrain":
        return speechbrain_name(settings.speechbrain_model)
    return settings.speaker_backend


def _savedir(settings: Settings, source: str) -> Path:
    """Where SpeechBrain collects a model's files (links into the hub cache, or into a local directory):
    MODEL_CACHE_DIR/speechbrain/<source, sanitised>."""
    path = Path(source).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        key = f"local-{path.resolve().name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"
    else:
        key = source.replace("/", "--")
    key = re.sub(r"[^A-Za-z0-9._@-]+", "_", key)
    return hub_cache_dir(settings.model_cache_dir) / "speechbrain" / key


def load_embedder(settings: Settings) -> SpeakerEmbedder:
    """The backend `SPEAKER_BACKEND` names, on `settings.resolved_device()`; loaded once per process.
    `SPEAKER_PRECISION` applies to resemblyzer only (speechbrain runs float32)."""
    device = settings.resolved_device()
    if settings.speaker_backend == "resemblyzer":
        return ResemblyzerEmbedder(device=device, precision=settings.speaker_precision)
    if settings.speaker_backend == "speechbrain":
        source = settings.speechbrain_model
        return SpeechBrainEmbedder.load(
            source,
            savedir=_savedir(settings, source),
            token=settings.huggingface_token.get_secret_value() if settings.huggingface_token else None,
            device=device,
            cache_dir=settings.model_cache_dir,
        )
    raise ValueError(f"unknown SPEAKER_BACKEND {settings.speaker_backend!r}")


# --- clustering a conversation's voices (pure, no I/O) -----------------------------------------------------


class OnlineClusters:
    """A conversation's speakers, found online. Per conversation; not thread-safe.

    Each embedding joins the most similar active cluster if its cosine to that centroid is at least
    `assign_threshold`, else starts a new cluster. Single windows are noisy, so this splits eagerly; once two
    centroids (averages of many windows, much steadier) reach `merge_threshold`, the younger cluster is merged into
    the older. Ids never change meaning: a merged id is an alias of the survivor (`resolve`), and `drain_merges`
    tells the caller which labels to rewrite.
    """

    def __init__(self, assign_threshold: float, merge_threshold: float, max_members: int = 64) -> None:
        self.assign_threshold = assign_threshold
        self.merge_threshold = merge_threshold
        self.max_members = max_members
        self._sums: list[np.ndarray] = []
        self.seconds: list[float] = []
        self._members: list[list[np.ndarray]] = []
        self._alias: dict[int, int] = {}
        self._merges: list[tuple[int, int]] = []

    def __len__(self) -> int:
        """Active clusters."""
        return len(self._sums) - len(self._alias)

    @property
    def created(self) -> int:
        """Clusters ever created (ids 0..created-1), merged ones included."""
        return len(self._sums)

    def active(self) -> list[int]:
        return [i for i in range(len(self._sums)) if i not in self._alias]

    def resolve(self, cluster: int) -> int:
        while cluster in self._alias:
            cluster = self._alias[cluster]
        return cluster

    def centroid(self, cluster: int) -> np.ndarray:
        s = self._sums[self.resolve(cluster)]
        return s / max(float(np.linalg.norm(s)), 1e-9)

    def members(self, cluster: int) -> np.ndarray:
        """(m, dim) the cluster's most recent embeddings (at most max_members)."""
        m = self._members[self.resolve(cluster)]
        return np.stack(m) if m else np.zeros((0, 0), np.float32)

    def assign(self, embedding: np.ndarray, seconds: float) -> int:
        ids = self.active()
        best = None
        if ids:
            scores = np.stack([self.centroid(i) for i in ids]) @ embedding
            k = int(np.argmax(scores))
            if scores[k] >= self.assign_threshold:
                best = ids[k]
        if best is None:
            self._sums.append(np.zeros(len(embedding), np.float64))
            self.seconds.append(0.0)
            self._members.append([])
            best = len(self._sums) - 1
        self._sums[best] += embedding * seconds  # weighted by speech duration
        self.seconds[best] += seconds
        self._members[best].append(np.asarray(embedding, np.float32))
        del self._members[best][: -self.max_members]
        self._merge()
        return self.resolve(best)

    def _merge(self) -> None:
        while True:
            ids = self.active()
            if len(ids) < 2:
                return
            c = np.stack([self.centroid(i) for i in ids])
            sim = c @ c.T
            np.fill_diagonal(sim, -1.0)
            i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
            if sim[i, j] < self.merge_threshold:
                return
            keep, gone = ids[min(i, j)], ids[max(i, j)]
            self._sums[keep] += self._sums[gone]
            self.seconds[keep] += self.seconds[gone]
            self._members[keep] = (self._members[keep] + self._members[gone])[-self.max_members :]
            self._members[gone] = []
            self._alias[gone] = keep
            self._merges.append((gone, keep))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays (for storage with the conversation, so labels survive a reconnect)."""
        if not self._sums:
            empty = np.zeros((0, 0))
            return {"sums": empty, "seconds": np.zeros(0), "alias": np.zeros((0, 2), np.int64),
                    "members": empty.astype(np.float32), "member_counts": np.zeros(0, np.int64)}
        dim = len(self._sums[0])
        return {
            "sums": np.array(self._sums, np.float64).reshape(-1, dim),
            "seconds": np.array(self.seconds, np.float64),
            "alias": np.array(sorted(self._alias.items()), np.int64).reshape(-1, 2),
            "members": np.array([m for ms in self._members for m in ms], np.float32).reshape(-1, dim),
            "member_counts": np.array([len(ms) for ms in self._members], np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], assign_threshold: float,
                    merge_threshold: float) -> OnlineClusters:
        oc = cls(assign_threshold, merge_threshold)
        oc._sums = [row.copy() for row in arrays["sums"]]
        oc.seconds = [float(x) for x in arrays["seconds"]]
        oc._alias = {int(a): int(b) for a, b in arrays["alias"]}
        members, i = [], 0
        for n in arrays["member_counts"]:
            members.append([row for row in arrays["members"][i : i + n]])
            i += n
        oc._members = members
        return oc

    def drain_merges(self) -> list[tuple[int, int]]:
        """(merged id, surviving id) pairs since the last call."""
        merges, self._merges = self._merges, []
        return merges


# Calibrated on real speech with bench/speaker_calibration.py (resemblyzer); see the README's "Speakers" section.
# Live simulation over sample.wav + 9 AMI excerpts (bench/speaker_calibration.py), 1.2 s windows every 0.4 s;
# mean agreement with the reference speakers 0.912 at 0.75 / 0.90 when chosen (0.902 in float32 and 0.882 in bf16
# since the script embeds complete windows only, as the tagger does). A sharp optimum on 5 minutes of audio:
CLUSTER_ASSIGN_THRESHOLD = 0.75  # window → centroid. At 0.70 sample.wav's two voices share one cluster (0.54 there,
# mean 0.82); at 0.80 speakers split into several clusters (mean 0.80)
CLUSTER_MERGE_THRESHOLD = 0.90  # centroid ↔ centroid. Averaged centroids of one voice meet at ~0.9; at 0.85 two
# of sample.wav's voices merge (0.54 there, mean 0.86); without merging AMI speakers stay split (mean 0.88)
