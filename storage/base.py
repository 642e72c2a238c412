"""The repository interface every storage backend implements. Profiles only so far; conversations come next.

Speaker profiles hold the embeddings of enrolled voices: the user's own (`kind="user"`, at most one per uid) and
other people's (`kind="person"`). Embeddings from different models are not comparable, so each profile records
the embedder (`model`) that made them; matching ignores profiles made by another model.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ProfileKind = Literal["user", "person"]


@dataclass
class SpeakerProfile:
    uid: str
    kind: ProfileKind
    model: str  # the embedder that made the embeddings, e.g. "resemblyzer"
    embeddings: np.ndarray  # (n, dim) float32, each L2-normalised: one row per enrolled clip
    speech_seconds: float = 0.0  # how much speech the embeddings came from
    name: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def centroid(self) -> np.ndarray:
        """(dim,) the normalised mean of the enrolled embeddings."""
        mean = self.embeddings.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-9)


class Storage(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> bool:
        """Reachable and answering (for /ready)."""

    @abstractmethod
    async def save_profile(self, profile: SpeakerProfile) -> None:
        """Insert or replace the profile and all its embeddings."""

    @abstractmethod
    async def add_profile_embeddings(self, uid: str, profile_id: str, embeddings: np.ndarray, seconds: float) -> bool:
        """Append embeddings to a profile of this uid; False if there is no such profile."""

    @abstractmethod
    async def list_profiles(self, uid: str) -> list[SpeakerProfile]: ...

    @abstractmethod
    async def get_profile(self, uid: str, profile_id: str) -> SpeakerProfile | None: ...

    @abstractmethod
    async def delete_profile(self, uid: str, profile_id: str) -> bool: ...

    async def user_profile(self, uid: str) -> SpeakerProfile | None:
        return next((p for p in await self.list_profiles(uid) if p.kind == "user"), None)
