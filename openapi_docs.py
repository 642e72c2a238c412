"""The OpenAPI document behind `/docs`: security schemes (so the page has an Authorize button and try-it-out sends the
token), a tag per area, and the WebSocket routes, which OpenAPI cannot describe as paths, written out in the
description with their messages' JSON schemas (also under `components.schemas`).

`document(app)` returns the function to install as `app.openapi`; it builds the schema once and caches it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from streaming.protocol import ErrorEvent, ServiceStatusEvent, SpeakerAssigned, TranscriptSegment

TAGS = [
    {"name": "batch", "description": "Speech regions and speaker identification of uploaded files (`/v1/vad`, "
                                     "`/v1/speaker-identification`): what Omi's backend calls."},
    {"name": "conversations", "description": "Conversations and their transcripts, at Omi's paths and in its shapes; "
                                             "exports with `?format=`."},
    {"name": "voices", "description": "The user's voice profile and other people's voices (Omi's speech-profile and "
                                      "people routes, and ours)."},
    {"name": "webhooks", "description": "Developer webhooks (Omi's pusher) and their signing secret."},
    {"name": "users", "description": "Push-notification token, time zone and daily-summary settings."},
    {"name": "jobs", "description": "Scheduled jobs and their runs."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics: no token needed."},
    {"name": "deepgram", "description": "Deepgram's `/v1/listen` (prerecorded here; the live WebSocket at the same "
                                        "path) for Deepgram's SDKs: `Authorization: Token <token>` or `Bearer`."},
]

# Routes anyone may call: no security requirement is shown for them.
PUBLIC_PATHS = {"/health", "/ready", "/metrics"}
# Routes Omi's backend calls from its own network without a user token.
INTERNAL_PATHS = {"/v1/vad", "/v1/speaker-identification"}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http", "scheme": "bearer",
        "description": "A Firebase ID token (what the Omi app sends), or `ADMIN_KEY` followed by the uid; on a "
                       "loopback-only server (neither configured) the uid itself.",
    },
    "internalKey": {
        "type": "apiKey", "in": "header", "name": "X-Internal-Key",
        "description": "`INTERNAL_API_KEY`: Omi's backend calling `/v1/vad` and `/v1/speaker-identification` "
                       "(with `?uid=`) without a user token.",
    },
}


def _schema_text(model: Any) -> str:
    return json.dumps(model.model_json_schema(), indent=2)


def websocket_description() -> str:
    """Markdown for `/docs`: the streaming protocol, with the JSON schemas of its messages."""
    return f"""
## WebSocket `/v4/listen` (alias `/v3/listen`)

The Omi app's live stream. Authenticated at the upgrade with the same `Authorization` header as the REST routes
(refused with HTTP 403 before any message). Query: `codec` (`pcm8`, `pcm16`, `opus`, `opus_fs320`, `aac`,
`lc3_fs1030`), `sample_rate` (8000), `channels` (1; 2: a channel byte starts each frame), `language` (`en`, a code,
`multi`, `auto`), `conversation_timeout` (120 s; -1: 4 h), `include_speech_profile` (true), `source`.

**Client → server**: binary frames of audio in `codec`; frames of 2 bytes or less are keepalives. Text frames are
JSON commands: `speaker_assigned` fixes a speaker as the user (`person_id: "user"`) or a person:

```json
{_schema_text(SpeakerAssigned)}
```

**Server → client**: the text `ping` every `HEARTBEAT_S`; JSON arrays of transcript segments, upserted by `id` (a
segment may be sent again as it grows or is relabelled):

```json
{_schema_text(TranscriptSegment)}
```

and JSON events: `service_status` (`initiating`, `stt_initiating`, `ready`), `last_memory`,
`memory_processing_started`, `memory_created`, and `error` (the stream goes on unless it is closed):

```json
{_schema_text(ServiceStatusEvent)}
```

```json
{_schema_text(ErrorEvent)}
```

**Close codes**: 1000 normal; 1001 idle or shutting down; 1008 bad parameters or a client that does not read;
1011 STT unavailable or a server error; 1013 try again later (server full, storage down); 4001 / 4004 expired /
revoked Firebase token. The README's "Streaming API" has the details.
"""


def document(app: FastAPI):
    """The `app.openapi` replacement. Also lets a 4xx `detail` be a string: FastAPI documents only its validation
    errors' list, but the routes answer `{"detail": "<message>"}` too."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default()  # caches itself in app.openapi_schema; patched in place
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        error = schemas.get("HTTPValidationError", {})
        detail = error.get("properties", {}).get("detail")
        if detail is not None:
            title = detail.pop("title", "Detail")
            error["properties"]["detail"] = {"title": title, "anyOf": [detail, {"type": "string"}]}
        for model in (TranscriptSegment, ServiceStatusEvent, ErrorEvent, SpeakerAssigned):
            schemas.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
        components["securitySchemes"] = SECURITY_SCHEMES
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path in PUBLIC_PATHS:
                    operation["security"] = []
                elif path in INTERNAL_PATHS:
                    operation["security"] = [{"bearer": []}, {"internalKey": []}]
                else:
                    operation["security"] = [{"bearer": []}]
        schema["tags"] = TAGS
        schema["info"]["description"] = (schema["info"].get("description") or "") + websocket_description()
        return app.openapi_schema

    return openapi
