"""Deepgram's `/v1/listen` API served by this server's own pipeline, so Deepgram's SDKs (and what is built on them)
can point their base URL here.

- `options`: the query parameters Deepgram takes, checked (a bad one is Deepgram's 400 at the upgrade or request);
- `messages`: the JSON shapes (live `Results` / `Metadata` / `UtteranceEnd` / `SpeechStarted` / `Error`, the
  prerecorded response), as deepgram-sdk 7.17 and `@deepgram/sdk` 5.13 parse them;
- `live`: one `WS /v1/listen` stream: a `Pipeline` (decode, VAD gate, the configured STT, speaker tagging) whose
  result tap is translated into `Results`; the client's `KeepAlive` / `Finalize` / `CloseStream`;
- `prerecorded`: `POST /v1/listen`: a whole file through the VAD gate and STT on the batch lane;
- `routes`: the router, the auth forms (`Token`, `Bearer`, the `token` / `bearer` WebSocket subprotocol) and
  Deepgram's error bodies.

Design: a stream here is a transcription session only. Unlike `/v4/listen` it keeps no conversation, stores no
segment and calls no webhook (a Deepgram client expects none of that); the Omi segment builder still runs inside the
`Pipeline` but its output is dropped.
"""
