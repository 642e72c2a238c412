"""`/v1/speaker-identification`'s work: the live tagger's matching rules (`profile_match`: s-norm against the shipped
cohort, `MATCH_RULES`) over given segments of a file. Its embeddings go into the speaker pool's batch lane
(`pool.BATCH`): served when no live window waits, never counted as live saturation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from streaming.pool import BATCH
from streaming.profile_match import MatchRules, ProfileIndex
from streaming.stt import SAMPLE_RATE
from streaming.vad import VadBackend, VadParams, detect_regions


class SegmentIdentifier:
    """Who speaks in each segment of a file. Shared (one per app), stateless between calls."""

    def __init__(self, pool, vad_backend: VadBackend, vad_params: VadParams, rules: MatchRules,
                 run_blocking: Callable[..., Awaitable[Any]] | None = None) -> None:
        """`run_blocking(fn, *args)`: where the per-segment VAD runs (the app's low-priority `BatchThreads.run`);
        default a thread of asyncio's executor."""
        self._pool = pool
        self._run_blocking = run_blocking or asyncio.to_thread
        self._vad_backend = vad_backend
        self._vad_params = vad_params
        self.rules = rules

    def _windows(self, audio: np.ndarray, spans: list[tuple[float, float]]) -> list[tuple[list[np.ndarray], float]]:
        """Blocking: per segment, its speech (VAD-trimmed) as one clip ([] if under the rules' `min_seconds`: it could
        not match, so it is not embedded), and its seconds."""
        out = []
        length_s = len(audio) / SAMPLE_RATE
        for start, end in spans:
            # Clamped to the file first: int(x * rate) of a huge value would be a huge slice index.
            clip = audio[int(min(start, length_s) * SAMPLE_RATE) : int(min(end, length_s) * SAMPLE_RATE)]
            regions = detect_regions(self._vad_backend, clip, self._vad_params) if len(clip) else []
            speech = np.concatenate([clip[s:e] for s, e in regions]) if regions else clip[:0]
            seconds = len(speech) / SAMPLE_RATE
            if seconds < self.rules.min_seconds:
                out.append(([], seconds))
                continue
            out.append(([speech], seconds))  # the whole speech: the embedder averages its own windows over it
        return out

    async def identify(self, audio: np.ndarray, spans: list[tuple[float, float]],
                       index: ProfileIndex) -> list[dict[str, Any]]:
        """One `{is_user, person_id}` per span. Raises PoolSaturated when the pool's batch lane is full."""
        windows = await self._run_blocking(self._windows, audio, spans)
        flat = [w for ws, _ in windows for w in ws]
        embeddings = await self._pool.embed_many(flat, BATCH) if flat and len(index) else None
        results, i = [], 0
        for ws, seconds in windows:
            match = None
            if ws and embeddings is not None:
                mean = embeddings[i : i + len(ws)].mean(axis=0)
                match = index.match(mean / max(float(np.linalg.norm(mean)), 1e-9), seconds, self.rules)
            i += len(ws)
            results.append({"is_user": bool(match and match.kind == "user"),
                            "person_id": match.profile_id if match and match.kind == "person" else None})
        return results
