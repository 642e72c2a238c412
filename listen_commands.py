"""Text frames on `/v4/listen`: the Omi app's JSON commands.

Omi's rule, kept here: a text frame that is not JSON, or has an unknown `type`, is logged and ignored (no error
event, no close). Commands this server does not serve are ignored the way Omi's backend does when the feature is
off:

- `speaker_assigned` {speaker_id, person_id, person_name, segment_ids}: applied for the user and the user's own
  people (see `assign_speaker`).
- `image_chunk` (photos from camera wearables): ignored silently; Omi's own test expects no event for an incomplete
  upload, and photo description is not built here.
- `suggested_transcript` (the app's on-phone STT with `custom_stt=enabled`) and `skip_question` (onboarding):
  ignored; the server transcribes the audio itself.
- `CloseStream` (ours, Deepgram's name; the Omi app never sends it): the stream ends as if the client had closed,
  but the server sends the last transcript segments first, then closes 1000 (the CLI's end of a file).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from streaming.pipeline import Pipeline
from streaming.protocol import SpeakerAssigned
from streaming.tagging import WINDOW_S

log = logging.getLogger("server")

IGNORED_COMMANDS = frozenset({"image_chunk", "suggested_transcript", "skip_question"})
# Ours, not Omi's (Deepgram's name): finish the stream now. What was received is transcribed and sent, then the server
# closes with 1000, so a client streaming a file knows when it has everything (a close of its own would cut that off).
CLOSE_STREAM = "CloseStream"


@dataclass(frozen=True)
class CommandContext:
    """What a command may touch: this connection's pipelines (one per channel), and the shared storage as this
    user."""

    uid: str
    pipelines: list[Pipeline]
    storage: Any
    embedder_name: str


# The largest text frame parsed: a speaker_assigned with its most segment ids is about 200 KB. Larger frames (the
# app's photo chunks among them, which are ignored anyway) are dropped unparsed, so no client can make the event loop
# parse megabytes of JSON.
MAX_COMMAND_CHARS = 256 * 1024


async def handle_text(ctx: CommandContext, text: str) -> bool:
    """Applies one text command. True when the client asked to end the stream (`CloseStream`)."""
    if len(text) > MAX_COMMAND_CHARS:
        log.warning("ignoring a text frame of %d chars (over %d)", len(text), MAX_COMMAND_CHARS)
        return False
    try:
        command = json.loads(text)
        kind = command.get("type") if isinstance(command, dict) else None
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's recursion limit
        command, kind = None, None
    if not isinstance(kind, str):  # {"type": [...]}: no command (a list is not even hashable)
        kind = None
    if kind == "speaker_assigned":
        await assign_speaker(ctx, command)
    elif kind == CLOSE_STREAM:
        return True
    elif kind in IGNORED_COMMANDS:
        log.debug("ignoring %s (not served here)", kind)
    else:
        log.warning("ignoring text frame of %d chars (type=%r)", len(text), kind)
    return False


async def assign_speaker(ctx: CommandContext, command: dict[str, Any]) -> None:
    """The user says who a speaker is. The listed segments and that speaker's segments, from now on, become the
    user (`person_id: "user"`: is_user true, person_id null) or the person; the tag is never overwritten by the
    speaker tagger. The changed segments are sent again (and stored). The speaker's voice is added to that profile
    when it was made by the running embedder.

    A person must be one of this user's people (the app only sends ids from `/v1/users/people`): another id, or
    one that cannot be checked while storage is down, is ignored with a logged warning, never written into the
    transcript (it could be another user's). No error event either way: Omi never answers this command with one."""
    try:
        assigned = SpeakerAssigned.model_validate(command)
    except ValidationError as exc:
        log.warning("ignoring speaker_assigned: %s", exc.errors()[0]["msg"])
        return
    try:
        profile = (await ctx.storage.user_profile(ctx.uid) if assigned.is_user
                   else await ctx.storage.get_profile(ctx.uid, assigned.person_id))
    except Exception as exc:
        if not assigned.is_user:
            log.warning("ignoring speaker_assigned: storage unavailable to check the person: %s", type(exc).__name__)
            return
        profile = None  # the user is always theirs to name; only the voice's learning is lost
    if not assigned.is_user and (profile is None or profile.kind != "person"):
        log.warning("ignoring speaker_assigned: not one of this user's people")
        return
    person_id = None if assigned.is_user else assigned.person_id
    changed, embeddings = [], np.zeros((0, 0), np.float32)
    for pipeline in ctx.pipelines:
        mine, voice = await pipeline.assign_speaker(assigned.speaker_id, person_id, assigned.is_user,
                                                    assigned.segment_ids)
        changed += mine
        embeddings = voice if len(voice) else embeddings
    log.info("speaker_assigned: speaker %s → %s, %d segments changed", assigned.speaker_id,
             "user" if assigned.is_user else "a person", len(changed))
    if not len(embeddings) or profile is None or profile.model != ctx.embedder_name:
        return
    try:
        await ctx.storage.add_profile_embeddings(ctx.uid, profile.id, embeddings, len(embeddings) * WINDOW_S)
    except Exception as exc:  # the relabel stands; only the profile's learning from it is lost
        log.warning("speaker_assigned: could not add the voice to the profile: %s", type(exc).__name__)
