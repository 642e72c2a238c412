"""The LLM summariser: Omi's `structured` (title, overview, emoji, category, action items) from any server that speaks
OpenAI's chat-completions protocol (Ollama, vLLM, llama.cpp server, OpenAI itself) at `LLM_BASE_URL`.

One POST to `{LLM_BASE_URL}/chat/completions` per finished conversation, asking for a JSON object
(`response_format: json_object`, temperature 0). The answer is validated; a missing or odd emoji and an unknown
category are replaced by the defaults, anything else wrong (the server unreachable, slow past `LLM_TIMEOUT_S`, a
non-2xx status, an answer that is not JSON or breaks the schema, one over `max_response_bytes`) logs a warning and
returns the plain summary: the conversation is never lost. Warnings name the conversation and what went wrong, never
the API key, the transcript or the model's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.base import Conversation, Segment
from summaries import DEFAULT_CATEGORY, DEFAULT_EMOJI, PlainSummarizer, Summarizer, Summary

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1_000_000
TITLE_MAX = 200
OVERVIEW_MAX = 4000
ACTION_ITEMS_MAX = 50
ACTION_ITEM_MAX_CHARS = 500
EMOJI_MAX_CHARS = 8  # one emoji can be several code points (ZWJ sequences, flags, skin tones)

# Omi's CategoryEnum values (backend/models/conversation_enums.py), in its order.
CATEGORIES = (
    "personal", "education", "health", "finance", "legal", "philosophy", "spiritual", "science", "entrepreneurship",
    "parenting", "romantic", "travel", "inspiration", "technology", "business", "social", "work", "sports",
    "politics", "literature", "history", "architecture", "music", "weather", "news", "entertainment", "psychology",
    "real", "design", "family", "economics", "environment", "other",
)
CATEGORY_ALIASES = {"romance": "romantic"}  # the enum member's name where it differs from its value

SYSTEM_PROMPT = f"""You summarise a recorded conversation for the person who wore the recording device.
The user message gives the conversation's language, when it started, and its transcript, one `Speaker: text` line
per turn. "You" is the wearer; "Speaker 0", "Speaker 1" and so on are unidentified voices, not names: never write
such a label in your answer, and never invent names. The transcript comes from speech recognition and may contain
errors; a marker shows where the middle of a long transcript was left out.

Answer with one JSON object and nothing else, with exactly these keys:
- "title": a short headline (at most 10 words, Title Case) naming the main topic and its outcome.
- "overview": a few sentences with the main points, decisions and important details, in plain prose.
- "emoji": one single emoji that fits the subject or mood (prefer a specific one to a generic one).
- "category": exactly one of: {", ".join(CATEGORIES)}.
- "action_items": a list of strings, each a short task (at most 15 words, starting with a verb) that the wearer
  committed to or clearly needs to follow up on; an empty list when there is none. Leave out vague intentions,
  things already done, and other people's tasks that do not concern the wearer.
Write the title, overview and action items in the conversation's language. Report only what the transcript
says."""


class _Answer(BaseModel):
    """The model's JSON answer, checked."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    title: str = Field(min_length=1, max_length=TITLE_MAX)
    overview: str = Field(default="", max_length=OVERVIEW_MAX)
    emoji: str = DEFAULT_EMOJI
    category: str = DEFAULT_CATEGORY
    action_items: list[str] = Field(default_factory=list, max_length=ACTION_ITEMS_MAX)

    @field_validator("emoji", mode="before")
    @classmethod
    def _emoji(cls, value: Any) -> str:
        if not isinstance(value, str):
            return DEFAULT_EMOJI
        value = value.strip()
        if not value or len(value) > EMOJI_MAX_CHARS or any(c.isascii() for c in value):
            return DEFAULT_EMOJI
        return value

    @field_validator("category", mode="before")
    @classmethod
    def _category(cls, value: Any) -> str:
        if not isinstance(value, str):
            return DEFAULT_CATEGORY
        key = value.strip().lower()
        key = CATEGORY_ALIASES.get(key, key)
        return key if key in CATEGORIES else DEFAULT_CATEGORY

    @field_validator("action_items", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if value is None:
            return []
        if not isinstance(value, list):
            return value  # rejected as not a list
        items = []
        for item in value:
            if isinstance(item, dict):  # Omi's own ActionItem shape
                item = item.get("description")
            if isinstance(item, str):
                item = item.strip()
                if not item:
                    continue
                if len(item) > ACTION_ITEM_MAX_CHARS:
                    raise ValueError(f"an action item over {ACTION_ITEM_MAX_CHARS} characters")
            items.append(item)
        return items


class LlmFailure(Exception):
    """Why the LLM gave no usable summary; the message is safe to log (no key, transcript or answer text)."""


def transcript_text(segments: list[Segment], max_chars: int) -> str:
    """`Speaker: text` lines ("You" for the wearer), cut to `max_chars` with the middle elided."""
    lines = []
    for s in segments:
        if not s.text.strip():
            continue
        if s.is_user:
            who = "You"
        elif not s.speaker or re.fullmatch(r"SPEAKER_\d+", s.speaker):
            who = f"Speaker {s.speaker_id}"
        else:
            who = s.speaker
        lines.append(f"{who}: {s.text.strip()}")
    text = "\n".join(lines)
    if len(text) <= max_chars:
        return text
    marker = f"\n[… {len(text) - max_chars} characters left out …]\n"
    keep = max(max_chars - len(marker), 0)
    head = keep - keep // 2
    return text[:head] + marker + text[len(text) - keep // 2:] if keep else text[:max_chars]


def parse_answer(content: str) -> _Answer:
    """The model's message content (bare JSON, or JSON in a ``` fence, maybe with prose around it) → _Answer."""
    text = content.strip()
    fenced = re.search(r"```(?:json|JSON)?\s*\n?(.*?)```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise LlmFailure("the answer is not JSON") from None
        try:
            data = json.loads(text[start:end + 1])
        except json.JSONDecodeError:
            raise LlmFailure("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise LlmFailure("the answer is not a JSON object")
    try:
        return _Answer.model_validate(data)
    except ValidationError as exc:  # its str() quotes the input: name only where and what
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['type']}" for e in exc.errors())
        raise LlmFailure(f"the answer breaks the schema ({where})") from None


def message_content(body: Any) -> str:
    """choices[0].message.content of a chat-completions response body."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LlmFailure("the response has no choices[0].message.content") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise LlmFailure("the response's message content is empty")
    return content


class LlmSummarizer(Summarizer):
    """Summaries from an OpenAI-compatible chat-completions server; the plain summary whenever that fails."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 max_transcript_chars: int = 48000, max_response_bytes: int = MAX_RESPONSE_BYTES,
                 fallback: Summarizer | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = timeout_s
        self.max_transcript_chars = max_transcript_chars
        self.max_response_bytes = max_response_bytes
        self.fallback = fallback or PlainSummarizer()
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LlmSummarizer:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key is not None else None
        return cls(str(settings.llm_base_url), settings.llm_model, key, settings.llm_timeout_s,
                   settings.llm_max_transcript_chars)

    def __repr__(self) -> str:  # never the key
        return f"LlmSummarizer(url={self.url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def request_body(self, conversation: Conversation, segments: list[Segment]) -> dict[str, Any]:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(conversation.started_at))
        user = (f"Language: {conversation.language}\nStarted: {started}\n\nTranscript:\n"
                f"{transcript_text(segments, self.max_transcript_chars)}")
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "stream": False,
        }

    async def summarize(self, conversation: Conversation, segments: list[Segment]) -> Summary:
        try:
            async with asyncio.timeout(self.timeout_s):  # the whole exchange, not each read
                answer = await self._ask(self.request_body(conversation, segments))
        except LlmFailure as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"timed out: no answer within {self.timeout_s:g} s"
        except httpx.TimeoutException as exc:
            reason = f"timed out ({type(exc).__name__})"
        except httpx.HTTPError as exc:  # connect and protocol errors; their text has no key or body
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # never lose the conversation over a summary
            reason = f"unexpected {type(exc).__name__}"
        else:
            overview = answer.overview
            if not overview:
                overview = (await self.fallback.summarize(conversation, segments)).overview
            return Summary(title=answer.title, overview=overview, emoji=answer.emoji, category=answer.category,
                           action_items=tuple(answer.action_items))
        log.warning("LLM summary of conversation %s failed (%s); using the plain summary", conversation.id, reason)
        return await self.fallback.summarize(conversation, segments)

    async def _ask(self, body: dict[str, Any]) -> _Answer:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}  # bytes read = bytes sent
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        async with self._client.stream("POST", self.url, json=body, headers=headers) as response:
            if not response.is_success:
                raise LlmFailure(f"HTTP {response.status_code} from the LLM server")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_response_bytes:
                raise LlmFailure(f"response of {length} bytes, over {self.max_response_bytes}")
            raw = bytearray()
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > self.max_response_bytes:
                    raise LlmFailure(f"response over {self.max_response_bytes} bytes")
        try:
            data = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlmFailure("the response body is not JSON") from None
        return parse_answer(message_content(data))
