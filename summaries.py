"""Summaries of finished conversations: title, overview, emoji, category and action items (Omi's `structured`).

`PlainSummarizer` is the offline default (no LLM). An LLM summariser implements the same interface; a failure of
one must fall back to the plain summary, never lose the conversation. `make_summarizer(settings)` picks one:
`llm_summary.LlmSummarizer` (any OpenAI-compatible chat-completions server) when LLM_BASE_URL is set.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.base import Conversation, Segment

if TYPE_CHECKING:
    from config import Settings

TITLE_MAX_CHARS = 80
DEFAULT_EMOJI = "🧠"  # Omi's default for a conversation with no emoji of its own
DEFAULT_CATEGORY = "other"  # one of Omi's CategoryEnum values


@dataclass(frozen=True)
class Summary:
    title: str
    overview: str
    emoji: str = DEFAULT_EMOJI
    category: str = DEFAULT_CATEGORY
    action_items: tuple[str, ...] = field(default_factory=tuple)


class Summarizer(ABC):
    """Makes the summary of a finished conversation (with at least one non-empty segment)."""

    @abstractmethod
    async def summarize(self, conversation: Conversation, segments: list[Segment]) -> Summary: ...

    async def aclose(self) -> None:
        """Release what it holds (an HTTP client); the server calls it at shutdown."""
        return None


class PlainSummarizer(Summarizer):
    """No LLM: the first sentence as the title; word count, speakers and duration as the overview."""

    async def summarize(self, conversation: Conversation, segments: list[Segment]) -> Summary:
        text = " ".join(s.text for s in segments).strip()
        first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        title = first if len(first) <= TITLE_MAX_CHARS else first[: TITLE_MAX_CHARS - 1].rsplit(" ", 1)[0] + "…"
        speakers = sorted({s.speaker for s in segments})
        people = {s.person_id for s in segments if s.person_id}
        minutes = max(s.end for s in segments) / 60 if segments else 0.0
        user_words = sum(len(s.text.split()) for s in segments if s.is_user)
        overview = (f"{len(text.split())} words in {minutes:.1f} min, {len(speakers)} speaker"
                    f"{'s' if len(speakers) != 1 else ''}" + (f", {len(people)} known" if people else "")
                    + (f"; you said {user_words} words" if user_words else "") + ".")
        return Summary(title=title, overview=overview)


def make_summarizer(settings: Settings) -> Summarizer:
    """The LLM summariser (llm_summary.py) when LLM_BASE_URL is set, else the plain one."""
    if settings.llm_base_url and settings.llm_base_url.strip():
        from llm_summary import LlmSummarizer  # it imports this module

        return LlmSummarizer.from_settings(settings)
    return PlainSummarizer()
