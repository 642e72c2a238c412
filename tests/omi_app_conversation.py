"""A port of the Omi app's conversation parsers (Dart) to Python, to check our wire shapes without the app.

Ported from BasedHardware/omi, two app versions:
- current: `app/lib/backend/schema/conversation.dart` (`ServerConversation.fromJson` normalises `structured` with
  the hand-written `Structured.fromJson` of `structured.dart`, then parses everything with the generated
  `GeneratedConversation.fromJson` of `gen/conversation_wire.g.dart@0235d91c`; segments through
  `TranscriptSegment.fromGenerated`).
- mid-2025: `conversation.dart@8779de6c` with the hand-written `Structured.fromJson` / `ActionItem.fromJson` /
  `Event(...)` of its `structured.dart` (title, overview, emoji and category non-null strings) and
  `transcript_segment.dart@a2db53f6` (the speaker's number parsed from `SPEAKER_<n>`). Apps from before the
  rename read the same fields (with `plugins_results` and the `memory` key), so this port stands for them too.
Plus `message_event.dart@02a29d51` (`memory_processing_started`, `memory_created`) and `CreateConversationResponse`.

Faithful where the Dart code can throw: every field read with a cast (`as String`, `as List`, an implicit cast of
`dynamic` into a typed parameter, `DateTime.parse`, `int.parse`, the generated `_required` / `_readFieldValue`)
must be present and of that type here too, or this raises where Dart would: DartTypeError for a failed cast (Dart's
TypeError), DartFormatException for a FormatException, DartRangeError for an index out of range. Dart's `int` and
`double` are told apart as JSON decodes them (1 vs 1.0), and a bool is never a number. What the app does after
parsing (UI, caches) is not ported. `DateTime.parse` is ported as its format regex (range overflow not checked).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any


class DartError(Exception):
    """Where the Dart parser would throw."""


class DartTypeError(DartError):
    """Dart's TypeError: a cast (explicit `as`, or `dynamic` into a typed parameter) failed."""


class DartFormatException(DartError):
    pass


class DartRangeError(DartError):
    pass


# -- Dart's types and core functions -----------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "String": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool), "int": _is_int,
    "double": lambda v: isinstance(v, float), "num": _is_num, "List": lambda v: isinstance(v, list),
    "Map": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
}


def cast(value: Any, dart_type: str, where: str) -> Any:
    """`value as T` (or `dynamic` passed where T is expected); `T?` allows null."""
    nullable = dart_type.endswith("?")
    if value is None and nullable:
        return None
    if value is None or not _CHECKS[dart_type.rstrip("?")](value):
        raise DartTypeError(f"{where}: {type(value).__name__} {value!r:.60} is not a subtype of {dart_type}")
    return value


_DART_DATE = re.compile(r"^([+-]?\d{4,6})-?(\d\d)-?(\d\d)(?:[ T](\d\d)(?::?(\d\d)(?::?(\d\d)(?:[.,](\d+))?)?)?"
                        r"( ?[zZ]| ?([-+])(\d\d)(?::?(\d\d))?)?)?$", re.ASCII)


def dart_datetime_try_parse(value: str) -> datetime | None:
    """DateTime.tryParse (its format; a value without a zone is local time in Dart, taken as UTC here)."""
    m = _DART_DATE.match(value)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction = (m.group(i) for i in range(1, 8))
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    base = datetime(int(year), 1, 1, tzinfo=UTC)
    moment = base.replace(month=int(month), day=int(day)) + timedelta(
        hours=int(hour or 0), minutes=int(minute or 0), seconds=int(second or 0), microseconds=micro)
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11) or 0))
        moment = moment - offset if m.group(9) == "+" else moment + offset
    return moment


def dart_datetime_parse(value: Any, where: str) -> datetime:
    """DateTime.parse(dynamic): a String (else TypeError) in its format (else FormatException)."""
    parsed = dart_datetime_try_parse(cast(value, "String", where))
    if parsed is None:
        raise DartFormatException(f"{where}: Invalid date format {value!r}")
    return parsed


def dart_int_parse(text: str, where: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise DartFormatException(f"{where}: invalid radix-10 number {text!r}")
    return int(text)


def _int_try_parse(text: str) -> int | None:
    return int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else None


def _double_try_parse(text: str) -> float | None:
    try:
        return float(text) if not re.search(r"[_xX]", text) else None
    except ValueError:
        return None


def _to_string(v: Any) -> str:
    """Dart's toString of a JSON value, as far as double.tryParse(json[x].toString()) needs it."""
    return "null" if v is None else ("true" if v is True else "false" if v is False else str(v))


# -- current app: gen/conversation_wire.g.dart ------------------------------------------------------------------

_ABSENT = object()


def _read_string(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _read_int(v: Any) -> int | None:
    return v if _is_int(v) else _int_try_parse(v) if isinstance(v, str) else None


def _read_double(v: Any) -> float | None:
    return float(v) if _is_num(v) else _double_try_parse(v) if isinstance(v, str) else None


def _read_bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _read_datetime(v: Any) -> datetime | None:
    return dart_datetime_try_parse(v) if isinstance(v, str) else None


def _read_map(v: Any) -> dict | None:
    return v if isinstance(v, dict) else None


def _required(value: Any, name: str) -> Any:
    if value is None:
        raise DartFormatException(f"Missing required field: {name}")
    return value


def _object_list(parse: Callable[[dict], Any]) -> Callable[[Any], list | None]:
    def read(v: Any) -> list | None:
        return [parse(_required(_read_map(item), "list item")) for item in v] if isinstance(v, list) else None
    return read


def _string_list(v: Any) -> list | None:
    return [_required(_read_string(item), "list item") for item in v] if isinstance(v, list) else None


def _double_list(v: Any) -> list | None:
    return [_required(_read_double(item), "list item") for item in v] if isinstance(v, list) else None


def _object(parse: Callable[[dict], Any]) -> Callable[[Any], Any]:
    return lambda v: parse(v) if isinstance(v, dict) else None


def _f(json: dict, names: str, read: Callable[[Any], Any], *, required: bool, nullable: bool,
       default: Any = None) -> Any:
    """`_readFieldValue(_readField(json, names), ...)`, wrapped in `_required` when the Dart field is non-null
    (which the generator does exactly when `nullable` is false)."""
    field = _ABSENT
    for name in names.split("|"):
        if name in json:
            field = json[name]
            break
    name = names.split("|")[0]
    if field is _ABSENT:
        if required:
            raise DartFormatException(f"Missing required field: {name}")
        value = default
    elif field is None:
        if not nullable:
            raise DartFormatException(f"Null field: {name}")
        value = None
    else:
        value = read(field)
        if value is None:
            raise DartFormatException(f"Invalid field: {name}")
    return value if nullable else _required(value, name)


def _fields(json: dict, spec: dict[str, tuple]) -> dict:
    return {key: _f(json, key, read, required=req, nullable=nul, default=dflt)
            for key, (read, req, nul, dflt) in spec.items()}


def generated_translation(j: dict) -> dict:
    return _fields(j, {"lang": (_read_string, True, False, None), "text": (_read_string, True, False, None)})


def generated_transcript_segment(j: dict) -> dict:
    return _fields(j, {
        "end": (_read_double, True, False, None), "id": (_read_string, False, True, None),
        "is_user": (_read_bool, True, False, None), "person_id": (_read_string, False, True, None),
        "speaker": (_read_string, False, True, "SPEAKER_00"), "speaker_id": (_read_int, False, True, None),
        "speech_profile_processed": (_read_bool, False, False, True), "start": (_read_double, True, False, None),
        "stt_provider": (_read_string, False, True, None), "text": (_read_string, True, False, None),
        "translations": (_object_list(generated_translation), False, True, None)})


def generated_action_item(j: dict) -> dict:
    spec = {"completed": (_read_bool, False, False, False), "description": (_read_string, True, False, None)}
    for key in ("candidate_action", "capture_kind", "capture_owner", "conversation_id", "target_task_id"):
        spec[key] = (_read_string, False, True, None)
    for key in ("capture_confidence", "ownership_confidence"):
        spec[key] = (_read_double, False, True, None)
    for key in ("completed_at", "created_at", "due_at", "updated_at"):
        spec[key] = (_read_datetime, False, True, None)
    spec["concrete_deliverable"] = (_read_bool, False, True, None)
    return _fields(j, spec)


def generated_event(j: dict) -> dict:
    return {**_fields(j, {"created": (_read_bool, False, False, False),
                          "description": (_read_string, False, False, ""),
                          "duration": (_read_int, False, False, 30), "title": (_read_string, True, False, None)}),
            "start": _f(j, "start|startsAt", _read_datetime, required=True, nullable=False)}


def generated_structured(j: dict) -> dict:
    return {**_fields(j, {"category": (_read_string, False, False, "other"),
                          "emoji": (_read_string, False, False, "🧠"),
                          "events": (_object_list(generated_event), False, True, None),
                          "overview": (_read_string, False, False, ""), "title": (_read_string, False, False, "")}),
            "action_items": _f(j, "action_items|actionItems", _object_list(generated_action_item), required=False,
                               nullable=True)}


def _simple(spec: dict[str, tuple]) -> Callable[[dict], dict]:
    return lambda j: _fields(j, spec)


generated_app_result = _simple({"app_id": (_read_string, True, True, None),
                                "content": (_read_string, True, False, None)})
generated_plugin_result = _simple({"content": (_read_string, True, False, None),
                                   "plugin_id": (_read_string, True, True, None)})
generated_geolocation = _simple({"latitude": (_read_double, True, False, None),
                                 "longitude": (_read_double, True, False, None),
                                 "address": (_read_string, False, True, None)})
generated_photo = _simple({"base64": (_read_string, True, False, None),
                           "created_at": (_read_datetime, False, True, None),
                           "description": (_read_string, False, True, None), "id": (_read_string, False, True, None),
                           "discarded": (_read_bool, False, False, False)})
generated_audio_file = _simple({"chunk_timestamps": (_double_list, True, False, None),
                                "conversation_id": (_read_string, True, False, None),
                                "duration": (_read_double, True, False, None), "id": (_read_string, True, False, None),
                                "uid": (_read_string, True, False, None)})
generated_calendar_event = _simple({"end_time": (_read_datetime, True, False, None),
                                    "event_id": (_read_string, True, False, None),
                                    "start_time": (_read_datetime, True, False, None),
                                    "title": (_read_string, True, False, None)})
generated_conversation_audio = _simple({"audio_files_fingerprint": (_read_string, True, False, None),
                                        "captured_duration": (_read_double, True, False, None),
                                        "duration": (_read_double, True, False, None)})
generated_label_suggestion = _simple({"person_name": (_read_string, True, False, None),
                                      "speaker_id": (_read_int, True, False, None)})


def generated_conversation(j: dict) -> dict:
    spec: dict[str, tuple] = {
        "apps_results": (_object_list(generated_app_result), False, False, []),
        "audio_files": (_object_list(generated_audio_file), False, False, []),
        "calendar_event": (_object(generated_calendar_event), False, True, None),
        "conversation_audio": (_object(generated_conversation_audio), False, True, None),
        "created_at": (_read_datetime, True, False, None),
        "external_data": (_read_map, False, True, None),
        "finished_at": (_read_datetime, True, True, None),  # the key is required, its value may be null
        "started_at": (_read_datetime, True, True, None),
        "geolocation": (_object(generated_geolocation), False, True, None),
        "id": (_read_string, True, False, None),
        "photos": (_object_list(generated_photo), False, False, []),
        "plugins_results": (_object_list(generated_plugin_result), False, False, []),
        "source": (_read_string, False, True, "omi"),
        "speaker_label_suggestions": (_object_list(generated_label_suggestion), False, False, []),
        "status": (_read_string, False, True, "completed"),
        "structured": (_object(generated_structured), True, False, None),
        "suggested_summarization_apps": (_string_list, False, False, []),
        "transcript_segments": (_object_list(generated_transcript_segment), False, False, []),
        "transcript_segments_compressed": (_read_bool, False, True, False),
        "updated_at": (_read_datetime, False, True, None),
        "visibility": (_read_string, False, False, "private"),
    }
    for key in ("deferred", "discarded", "is_locked", "private_cloud_sync_enabled", "starred"):
        spec[key] = (_read_bool, False, False, False)
    for key in ("app_id", "call_id", "client_device_id", "client_platform", "data_protection_level", "folder_id",
                "language", "processing_conversation_id", "processing_memory_id"):
        spec[key] = (_read_string, False, True, None)
    return _fields(j, spec)


def current_structured(j: dict) -> dict:
    """structured.dart's Structured.fromJson (current), returned as `toGenerated().toJson()`, which is what
    ServerConversation.fromJson hands on to the generated parser."""
    out = {"title": cast(j.get("title") if j.get("title") is not None else "", "String", "Structured.title"),
           "overview": cast(j.get("overview") if j.get("overview") is not None else "", "String", "overview"),
           "emoji": cast(j.get("emoji") if j.get("emoji") is not None else "🧠", "String", "emoji"),
           "category": cast(j.get("category") if j.get("category") is not None else "other", "String", "category"),
           "action_items": [], "events": []}
    items = j.get("actionItems") if j.get("actionItems") is not None else j.get("action_items")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            if item:
                out["action_items"].append({"description": item, "completed": False})
        elif isinstance(item, dict):
            parsed = generated_action_item(item)
            cast(item.get("deleted", False) if item.get("deleted") is not None else False, "bool", "deleted")
            out["action_items"].append({"description": parsed["description"], "completed": parsed["completed"]})
    events = j.get("events")
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict) or not event:
            continue
        raw_start = event.get("startsAt") if event.get("startsAt") is not None else event.get("start")
        if _is_int(raw_start):
            ev = {"title": cast(_or(event, "title", ""), "String", "Event.title"),
                  "start": datetime.fromtimestamp(raw_start, UTC),
                  "duration": cast(_or(event, "duration", 30), "int", "Event.duration")}
        else:
            ev = generated_event(event)
        out["events"].append({"title": ev["title"], "start": ev["start"].isoformat(), "duration": ev["duration"]})
    generated_structured(out)  # what GeneratedConversation.fromJson will read back
    return out  # the toJson() form: times as ISO strings


def parse_conversation_current(j: Any) -> dict:
    """ServerConversation.fromJson of the current app."""
    json = cast(j, "Map", "ServerConversation.fromJson")
    normalized = dict(json)
    if isinstance(json.get("structured"), dict):
        normalized["structured"] = current_structured(json["structured"])
    if isinstance(normalized.get("plugins_results"), list):
        normalized["plugins_results"] = [
            {**e, "plugin_id": e.get("appId", e.get("app_id"))} if isinstance(e, dict) and "plugin_id" not in e else e
            for e in normalized["plugins_results"]]
    generated = generated_conversation(normalized)
    cast(json.get("deleted") if json.get("deleted") is not None else False, "bool", "deleted")
    if isinstance(generated["external_data"], dict):  # ConversationExternalData.fromJson: text ?? ''
        text = generated["external_data"].get("text")
        cast(text if text is not None else "", "String", "external_data.text")
    for seg in generated["transcript_segments"]:  # TranscriptSegment(...): speakerId ?? int.tryParse(...) ?? 0
        if seg["speaker_id"] is None:
            parts = (seg["speaker"] or "SPEAKER_00").split("_")
            seg["speaker_id"] = (_int_try_parse(parts[1]) or 0) if len(parts) > 1 else 0
    return generated


# -- mid-2025 app: hand-written fromJson with implicit casts -----------------------------------------------------

def _or(j: dict, key: str, default: Any) -> Any:
    """`json[key] ?? default`."""
    return j.get(key) if j.get(key) is not None else default


def segment_2025(j: Any) -> dict:
    json = cast(j, "Map", "TranscriptSegment.fromJson")
    speaker = cast(_or(json, "speaker", "SPEAKER_00"), "String", "speaker")
    parts = speaker.split("_")
    if len(parts) < 2:
        raise DartRangeError(f"speaker {speaker!r}: index 1 out of range")
    translations = json.get("translations")
    if translations is not None:
        for t in cast(translations, "List", "translations"):
            cast(t, "Map", "Translation.fromJson")
            cast(t.get("lang"), "String", "lang"), cast(t.get("text"), "String", "text")
    return {"id": cast(_or(json, "id", ""), "String", "id"), "text": cast(json.get("text"), "String", "text"),
            "speaker": speaker, "speaker_id": dart_int_parse(parts[1], "speaker"),
            "is_user": cast(_or(json, "is_user", False), "bool", "is_user"),
            "person_id": cast(json.get("person_id"), "String?", "person_id"),
            "start": _double_try_parse(_to_string(json.get("start"))) or 0.0,
            "end": _double_try_parse(_to_string(json.get("end"))) or 0.0,
            "speech_profile_processed": cast(_or(json, "speech_profile_processed", True), "bool", "processed")}


def structured_2025(j: Any) -> dict:
    json = cast(j, "Map", "Structured.fromJson")
    out = {k: cast(json.get(k), "String", f"Structured.{k}") for k in ("title", "overview", "emoji", "category")}
    out["action_items"], out["events"] = [], []
    items = _or(json, "actionItems", json.get("action_items"))
    if items is not None:
        for item in cast(items, "List", "action_items"):  # `for (dynamic item in aItems)`: an Iterable
            if isinstance(item, str):
                if item:
                    out["action_items"].append({"description": item, "completed": False})
                continue
            item = cast(item, "Map", "ActionItem.fromJson")
            out["action_items"].append({"description": cast(item.get("description"), "String", "description"),
                                        "completed": cast(_or(item, "completed", False), "bool", "completed")})
            cast(_or(item, "deleted", False), "bool", "deleted")
    if json.get("events") is not None:
        for event in cast(json["events"], "List", "events"):
            if not isinstance(event, dict | list | str):
                raise DartTypeError(f"events: {event!r} has no isEmpty")
            if not event:
                continue
            event = cast(event, "Map", "event")
            out["events"].append({
                "title": cast(event.get("title"), "String", "Event.title"),
                "start": dart_datetime_parse(_or(event, "startsAt", event.get("start")), "Event.start"),
                "duration": cast(event.get("duration"), "int", "Event.duration"),
                "description": cast(_or(event, "description", ""), "String", "Event.description"),
                "created": cast(_or(event, "created", False), "bool", "Event.created")})
    return out


def parse_conversation_2025(j: Any) -> dict:
    """ServerConversation.fromJson of conversation.dart@8779de6c."""
    json = cast(j, "Map", "ServerConversation.fromJson")
    out = {"id": cast(json.get("id"), "String", "id"),
           "created_at": dart_datetime_parse(json.get("created_at"), "created_at"),
           "structured": structured_2025(json.get("structured"))}
    for key in ("started_at", "finished_at"):
        out[key] = dart_datetime_parse(json[key], key) if json.get(key) is not None else None
    out["transcript_segments"] = [segment_2025(s) for s in cast(_or(json, "transcript_segments", []), "List",
                                                                 "transcript_segments")]
    for result in cast(_or(json, "apps_results", []), "List", "apps_results"):
        result = cast(result, "Map", "AppResponse.fromJson")
        cast(result.get("content"), "String", "AppResponse.content")
    cast(_or(json, "suggested_summarization_apps", []), "List", "suggested_summarization_apps")
    if json.get("geolocation") is not None:
        geo = cast(json["geolocation"], "Map", "Geolocation.fromJson")
        cast(geo.get("latitude"), "num?", "latitude"), cast(geo.get("longitude"), "num?", "longitude")
    if json.get("photos") is not None:
        for photo in cast(json["photos"], "List", "photos"):
            photo = cast(photo, "Map", "ConversationPhoto.fromJson")
            cast(_or(photo, "id", ""), "String", "photo.id"), cast(_or(photo, "base64", ""), "String", "base64")
            cast(photo.get("description"), "String?", "photo.description")
            if photo.get("created_at") is not None:
                dart_datetime_parse(photo["created_at"], "photo.created_at")
            cast(_or(photo, "discarded", False), "bool", "photo.discarded")
    if json.get("external_data") is not None:
        cast(_or(cast(json["external_data"], "Map", "external_data"), "text", ""), "String", "external_data.text")
    for key in ("discarded", "deleted", "is_locked", "starred"):
        out[key] = cast(_or(json, key, False), "bool", key)
    out["language"] = cast(json.get("language"), "String?", "language")
    out["source"], out["status"] = json.get("source"), json.get("status")  # enum lookups: unknown names are null
    return out


# -- what the app calls -------------------------------------------------------------------------------------------

def parse_conversation(j: Any) -> dict:
    """Both parsers must accept it; returns the current one's result."""
    parse_conversation_2025(j)
    return parse_conversation_current(j)


def parse_create_response(j: Any) -> dict:
    """CreateConversationResponse.fromJson (POST /v1/conversations): current and mid-2025 read `conversation`, else
    `memory`; apps from before the rename read only `memory`. All must find a conversation."""
    json = cast(j, "Map", "CreateConversationResponse.fromJson")
    for message in cast(_or(json, "messages", []), "List", "messages"):
        cast(message, "Map", "ServerMessage")
    if json.get("memory") is None:
        raise DartError("apps before the rename read `memory`: no conversation")
    parse_conversation(json["memory"])
    return parse_conversation(json["conversation"] if json.get("conversation") is not None else json["memory"])


def parse_message_event(j: Any) -> dict:
    """MessageEvent.fromJson for the conversation events: `memory` through ServerConversation.fromJson, and
    `messages ?? []` into a List."""
    json = cast(j, "Map", "MessageEvent.fromJson")
    if json.get("type") not in ("memory_processing_started", "memory_created"):
        raise ValueError(f"not a conversation event: {json.get('type')!r}")
    memory = parse_conversation(cast(json.get("memory"), "Map", "memory"))
    if json["type"] == "memory_created":
        cast(_or(json, "messages", []), "List", "messages")
    return memory
