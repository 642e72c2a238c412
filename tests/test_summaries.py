"""The conversation summarisers: the LLM one against a real OpenAI-protocol server on loopback (tests/openai_server.py),
its fallback to the plain summary on every kind of failure, and `make_summarizer`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_server import OpenAITestServer, Reply, completion, raw
from server_process import free_port

from config import Settings
from conversations import ConversationService
from llm_summary import CATEGORIES, SYSTEM_PROMPT, LlmSummarizer
from storage.base import Conversation, Segment
from storage.sqlite import SqliteStorage
from summaries import PlainSummarizer, Summary, make_summarizer

KEY = "sk-test-very-secret-0123456789"
T0 = 1_700_000_000.0
SECRET_WORDS = "zebra marmalade protocol"  # only in the transcript: must never reach the logs

GOOD = {
    "title": "Plan The Launch Of The Beta",
    "overview": "You and a colleague agreed to ship the beta on Friday after fixing the login bug.",
    "emoji": "🚀",
    "category": "work",
    "action_items": ["Fix the login bug", "Email the beta testers"],
}


def conversation() -> tuple[Conversation, list[Segment]]:
    conv = Conversation(uid="u1", started_at=T0, last_activity_at=T0)
    texts = [(True, "We should ship the beta on Friday."), (False, "Only if the login bug is fixed."),
             (True, f"I will fix it tomorrow, {SECRET_WORDS}."), (False, "Then I email the testers.")]
    segments = [Segment(f"s{i}", conv.id, text, "SPEAKER_0" if user else "SPEAKER_1", 0 if user else 1, user, None,
                        i * 3.0, i * 3.0 + 2.5) for i, (user, text) in enumerate(texts)]
    return conv, segments


@pytest.fixture
def llm() -> Iterator[OpenAITestServer]:
    with OpenAITestServer() as server:
        yield server


def summarizer(server: OpenAITestServer, **kw) -> LlmSummarizer:
    return LlmSummarizer(server.base_url, kw.pop("model", "test-model"), kw.pop("api_key", KEY),
                         kw.pop("timeout_s", 5.0), **kw)


async def plain() -> Summary:
    return await PlainSummarizer().summarize(*conversation())


# -- the structured summary and the request --------------------------------------------------------------------------


async def test_summary_comes_from_the_answer(llm: OpenAITestServer) -> None:
    llm.script(completion(GOOD))
    s = summarizer(llm)
    try:
        summary = await s.summarize(*conversation())
    finally:
        await s.aclose()
    assert summary == Summary(GOOD["title"], GOOD["overview"], "🚀", "work",
                              ("Fix the login bug", "Email the beta testers"))


async def test_request_is_well_formed(llm: OpenAITestServer) -> None:
    llm.script(completion(GOOD))
    s = summarizer(llm, model="llama3.2:3b")
    await s.summarize(*conversation())
    await s.aclose()
    [req] = llm.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    body = req.body
    assert body["model"] == "llama3.2:3b"
    assert body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    system, user = (m["content"] for m in body["messages"])
    assert system == SYSTEM_PROMPT and "JSON" in system  # OpenAI's json_object mode wants the word in the prompt
    assert all(c in system for c in CATEGORIES)
    assert "Language: en" in user and "2023-11-14 22:13 UTC" in user
    assert user.endswith("Transcript:\nYou: We should ship the beta on Friday.\n"
                         "Speaker 1: Only if the login bug is fixed.\n"
                         f"You: I will fix it tomorrow, {SECRET_WORDS}.\nSpeaker 1: Then I email the testers.")


async def test_no_key_no_authorization_header(llm: OpenAITestServer) -> None:
    llm.script(completion(GOOD))
    s = summarizer(llm, api_key=None)
    assert (await s.summarize(*conversation())).title == GOOD["title"]
    await s.aclose()
    assert "authorization" not in llm.requests[0].headers


async def test_long_transcript_is_cut_in_the_middle(llm: OpenAITestServer) -> None:
    conv = Conversation(uid="u1", started_at=T0)
    segments = [Segment(f"s{i}", conv.id, f"sentence number {i:04d}.", "SPEAKER_0", 0, False, None, i, i + 0.5)
                for i in range(2000)]
    llm.script(completion(GOOD))
    s = summarizer(llm, max_transcript_chars=1000)
    await s.summarize(conv, segments)
    await s.aclose()
    user = llm.requests[0].body["messages"][1]["content"]
    transcript = user.split("Transcript:\n", 1)[1]
    assert len(transcript) <= 1000
    assert transcript.startswith("Speaker 0: sentence number 0000.")
    assert transcript.endswith("Speaker 0: sentence number 1999.")
    assert "characters left out" in transcript and "sentence number 1000." not in transcript


async def test_one_client_for_many_summaries(llm: OpenAITestServer) -> None:
    llm.script(completion(GOOD), completion(GOOD))
    s = summarizer(llm)
    await s.summarize(*conversation())
    client = s._client
    await s.summarize(*conversation())
    assert s._client is client and len(llm.requests) == 2
    await s.aclose()
    assert s._client is None
    await s.aclose()  # twice is fine


# -- lenient parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    "```json\n" + json.dumps(GOOD) + "\n```",
    "```\n" + json.dumps(GOOD) + "\n```",
    "Here is the summary:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope it helps.",
    "Sure! " + json.dumps(GOOD),
], ids=["json-fence", "bare-fence", "fence-with-prose", "prose-before"])
async def test_fenced_or_wrapped_answer(llm: OpenAITestServer, content: str) -> None:
    llm.script(completion(content))
    s = summarizer(llm)
    summary = await s.summarize(*conversation())
    await s.aclose()
    assert summary.title == GOOD["title"] and summary.action_items == tuple(GOOD["action_items"])


async def test_odd_fields_get_defaults(llm: OpenAITestServer) -> None:
    llm.script(
        completion({"title": "  A Title  ", "overview": "x", "emoji": ":rocket:", "category": "Quantum Stuff",
                    "action_items": ["", "  Call Bob ", {"description": "Pay the rent", "completed": False}]}),
        completion({"title": "B", "overview": "y", "category": "Romance", "emoji": None}),
        completion({"title": "C", "overview": "z", "category": " TECHNOLOGY ", "emoji": "👨‍👩‍👧",
                    "action_items": None}),
    )
    s = summarizer(llm)
    a, b, c = [await s.summarize(*conversation()) for _ in range(3)]
    await s.aclose()
    assert (a.title, a.emoji, a.category, a.action_items) == ("A Title", "🧠", "other", ("Call Bob", "Pay the rent"))
    assert (b.emoji, b.category, b.action_items) == ("🧠", "romantic", ())
    assert (c.emoji, c.category, c.action_items) == ("👨‍👩‍👧", "technology", ())


async def test_missing_overview_takes_the_plain_one(llm: OpenAITestServer) -> None:
    llm.script(completion({"title": "Only A Title"}))
    s = summarizer(llm)
    summary = await s.summarize(*conversation())
    await s.aclose()
    assert summary.title == "Only A Title" and summary.overview == (await plain()).overview
    assert (summary.emoji, summary.category, summary.action_items) == ("🧠", "other", ())


# -- every failure falls back to the plain summary, and the logs hold no key and no transcript -----------------------

FAILURES: dict[str, tuple[Reply | None, str]] = {
    "garbage": (completion("I am sorry, I cannot summarise this conversation."), "not JSON"),
    "json-array": (completion("[1, 2, 3]"), "not a JSON object"),
    "no-title": (completion({"overview": "no title here"}), "title: missing"),
    "empty-title": (completion({"title": "   ", "overview": "o"}), "title: string_too_short"),
    "long-title": (completion({"title": "t" * 201, "overview": "o"}), "title: string_too_long"),
    "long-overview": (completion({"title": "t", "overview": "o" * 4001}), "overview: string_too_long"),
    "items-not-list": (completion({"title": "t", "overview": "o", "action_items": "call Bob"}), "action_items"),
    "too-many-items": (completion({"title": "t", "overview": "o", "action_items": ["x"] * 51}), "action_items"),
    "long-item": (completion({"title": "t", "overview": "o", "action_items": ["x" * 501]}), "action_items"),
    "item-not-str": (completion({"title": "t", "overview": "o", "action_items": [3]}), "action_items"),
    "http-500": (raw(500, {"error": {"message": f"boom {KEY}"}}), "HTTP 500"),
    "http-401": (raw(401, {"error": {"message": "invalid api key"}}), "HTTP 401"),
    "body-not-json": (raw(200, "<html>proxy error</html>", content_type="text/html"), "body is not JSON"),
    "empty-choices": (raw(200, {"id": "x", "object": "chat.completion", "choices": []}), "no choices"),
    "null-content": (raw(200, {"choices": [{"message": {"role": "assistant", "content": None}}]}), "empty"),
    "too-big": (completion("x" * 1_100_000), "over 1000000"),
    "too-big-chunked": (raw(200, b"x" * 1_100_000, chunked=True), "response over 1000000 bytes"),
    "slow": (completion(GOOD, delay_s=3.0), "timed out"),
    "refused": (None, "ConnectError"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_failure_falls_back_to_plain(llm: OpenAITestServer, case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reply, reason = FAILURES[case]
    if reply is None:
        s = LlmSummarizer(f"http://127.0.0.1:{free_port()}/v1", "m", KEY, timeout_s=5.0)  # nothing listens there
    else:
        llm.script(reply)
        s = summarizer(llm, timeout_s=0.5)
    conv, segments = conversation()
    try:
        summary = await s.summarize(conv, segments)
    finally:
        await s.aclose()
    assert summary == await plain()
    warnings = [r for r in caplog.records if r.name == "llm_summary" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and conv.id in warnings[0].getMessage() and reason in warnings[0].getMessage()
    assert KEY not in caplog.text
    assert SECRET_WORDS not in caplog.text and "ship the beta" not in caplog.text


async def test_key_never_logged_on_success(llm: OpenAITestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm.script(completion(GOOD))
    s = summarizer(llm)
    await s.summarize(*conversation())
    await s.aclose()
    assert KEY not in caplog.text and KEY not in repr(s)


# -- choosing a summariser -------------------------------------------------------------------------------------------


def test_make_summarizer_plain_without_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_BASE_URL", raising=False)
    assert isinstance(make_summarizer(Settings(_env_file=None)), PlainSummarizer)
    assert isinstance(make_summarizer(Settings(_env_file=None, llm_base_url="")), PlainSummarizer)


def test_make_summarizer_llm_with_base_url() -> None:
    settings = Settings(_env_file=None, llm_base_url="http://127.0.0.1:11434/v1/", llm_model="llama3.2",
                        llm_api_key=KEY, llm_timeout_s=7, llm_max_transcript_chars=1234)
    s = make_summarizer(settings)
    assert isinstance(s, LlmSummarizer)
    assert (s.url, s.model, s.timeout_s, s.max_transcript_chars) == (
        "http://127.0.0.1:11434/v1/chat/completions", "llama3.2", 7, 1234)
    assert KEY not in repr(s)


# -- through the conversation service, on SQLite ---------------------------------------------------------------------


async def test_conversation_closed_with_the_llm_summary(llm: OpenAITestServer, tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "summaries.sqlite3")
    await store.open()
    llm.script(completion(GOOD))
    settings = Settings(_env_file=None, llm_base_url=llm.base_url, llm_model="m", llm_api_key=KEY)
    summarizer = make_summarizer(settings)
    service = ConversationService(store, summarizer=summarizer)
    try:
        conv = await service.attach("u1", "en", timeout_s=120.0, now=T0)
        _, segments = conversation()
        await service.record(conv, [Segment(s.id, conv.id, s.text, s.speaker, s.speaker_id, s.is_user, s.person_id,
                                            s.start, s.end) for s in segments], now=T0 + 12)
        closed = await service.close(conv, now=T0 + 200)
        assert closed.status == "completed"
        stored = await store.get_conversation("u1", conv.id)
        assert stored is not None and stored.status == "completed"
        assert (stored.title, stored.overview) == (GOOD["title"], GOOD["overview"])
        user = llm.requests[0].body["messages"][1]["content"]
        assert "You: We should ship the beta on Friday." in user
    finally:
        await summarizer.aclose()
        await store.close()
