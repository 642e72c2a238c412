"""The OpenAPI document behind /docs: security schemes for the Authorize button, a declared tag on every operation,
and the WebSocket protocol described with its messages' schemas."""

from __future__ import annotations

import httpx

from config import Settings
from server import create_app


def _schema(tmp_path) -> dict:
    app = create_app(Settings(_env_file=None, data_dir=tmp_path, stt_backend="local", lazy_models=True))
    return app.openapi()


def test_security_schemes_and_each_operations_requirement(tmp_path):
    schema = _schema(tmp_path)
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == schemes["bearer"] | {"type": "http", "scheme": "bearer"}
    assert schemes["internalKey"]["name"] == "X-Internal-Key" and schemes["internalKey"]["in"] == "header"
    paths = schema["paths"]
    assert paths["/health"]["get"]["security"] == [] and paths["/ready"]["get"]["security"] == []
    assert paths["/v1/vad"]["post"]["security"] == [{"bearer": []}, {"internalKey": []}]
    assert paths["/v1/conversations/{conversation_id}"]["get"]["security"] == [{"bearer": []}]
    user_routes = [op for path, ops in paths.items() if path.startswith("/v1/users") for op in ops.values()]
    assert user_routes and all(op["security"] == [{"bearer": []}] for op in user_routes)


def test_every_operation_has_a_declared_tag(tmp_path):
    schema = _schema(tmp_path)
    declared = {t["name"] for t in schema["tags"]}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("tags"), (method, path)
            assert set(operation["tags"]) <= declared, (method, path, operation["tags"])


def test_the_websocket_protocol_is_described_with_message_schemas(tmp_path):
    schema = _schema(tmp_path)
    text = schema["info"]["description"]
    assert "/v4/listen" in text and "speaker_assigned" in text and "1013" in text
    for name in ("TranscriptSegment", "ErrorEvent", "ServiceStatusEvent", "SpeakerAssigned"):
        assert name in schema["components"]["schemas"], name
    assert '"is_user"' in text and '"person_id"' in text  # the segment's JSON schema is written out


def test_a_real_server_serves_the_document_and_the_export_format(local_server):
    served = httpx.get(f"{local_server.http}/openapi.json", timeout=30).json()
    assert "securitySchemes" in served["components"]
    params = served["paths"]["/v1/conversations/{conversation_id}"]["get"]["parameters"]
    fmt = next(p for p in params if p["name"] == "format")
    assert "srt" in str(fmt["schema"])
    assert httpx.get(f"{local_server.http}/docs", timeout=30).status_code == 200
