"""Developer webhooks: Omi's "pusher", folded into the server.

A user's webhook settings (`user_webhooks.UserWebhooks`) say where their real-time transcript, audio bytes, finished
conversations and day summaries go; the live streams hand those to `dispatcher.WebhookDispatcher` through
non-blocking calls (`stream_tap.StreamWebhooks` is the per-stream part), and the dispatcher delivers them: one
ordered outbox per user and type, retries, a circuit breaker per receiver, signed with `signing` (Omi's "v1"),
never to private addresses (`targets`).
"""
