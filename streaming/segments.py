"""Transcript segments as the Omi app shows them: final words grouped by speaker, merged by Omi's rule. Pure: no I/O.

Partial transcripts (`SegmentBuilder.preview`) are shown under the id their final will take, so the app replaces
them by id and shows each word once; they never change the builder's (stored) segments.

One `SegmentBuilder` per channel of a connection (in its `Pipeline`); the channels of one connection share a
`SegmentTail`.
"""

from __future__ import annotations

import uuid

from streaming.protocol import TranscriptSegment
from streaming.stt import SentTimeline, Transcript
from streaming.tagging import SpeakerLabel

# A new utterance continues the previous segment when its speaker is the same (or both are the user) and it starts
# less than this after the previous one ended: Omi's `TranscriptSegment.combine_segments` rule. The 2025 app merges
# a new segment id into its last one by nearly the same rule (same speaker and is_user, < 30 s) and drops the id, so
# a later resend of that id would show its words twice; merging here first, under the existing id, avoids that.
APP_MERGE_GAP_S = 30.0


def continues(last: TranscriptSegment, label: SpeakerLabel, start: float) -> bool:
    """Omi's rule: does an utterance of `label` starting at `start` extend segment `last`? Pure."""
    same_speaker = last.speaker == label.speaker or (last.is_user and label.is_user)
    return same_speaker and start - last.end < APP_MERGE_GAP_S


class SegmentTail:
    """The segment a connection's client was sent last, shared by the builders of the connection's channels (one,
    or two with `channels=2`): Omi's merge rule looks at the app's last segment, whichever channel made it."""

    __slots__ = ("segment",)

    def __init__(self) -> None:
        self.segment: TranscriptSegment | None = None


class SegmentBuilder:
    """Turns final transcripts into Omi transcript segments. Pure: no I/O.

    Consecutive words of one speaker extend one segment (same `id`, sent again as it grows); a new utterance
    extends the connection's last segment too when Omi's merge rule holds (`continues`), else it starts a new one.
    Segments the user tagged (`tag`) keep that tag: relabels from the speaker tagger skip them. Words without a
    label from a tagger take `default_label` (a channel's fixed speaker).
    """

    def __init__(self, timeline: SentTimeline, offset: float = 0.0, tail: SegmentTail | None = None,
                 default_label: SpeakerLabel | None = None) -> None:
        self._timeline = timeline
        self.offset = offset  # conversation time of stream time 0 (a continued conversation resumes its clock)
        self.tail = tail or SegmentTail()
        self.default_label = default_label or SpeakerLabel(0)
        self._current: TranscriptSegment | None = None
        self.segments: list[TranscriptSegment] = []
        self.manual: set[str] = set()  # ids of segments the user tagged (speaker_assigned)
        # Partials: ids the client holds with partial words in them, and the id the next new segment takes (one a
        # partial showed first, so the final replaces it in the app instead of adding a second copy of its words).
        self._partial_shown: dict[str, TranscriptSegment] = {}
        self._reserved_id: str | None = None

    def restart(self, offset: float) -> None:
        """A new conversation begins: no segment continues across it, and its clock starts again."""
        self._current = None
        self.segments = []
        self.manual = set()
        self.tail.segment = None
        self.offset = offset
        self._partial_shown = {}
        self._reserved_id = None

    def seed(self, last: TranscriptSegment) -> None:
        """A continued conversation's last stored segment: new speech may extend it (as the app would merge it)."""
        self.segments = [last]
        self.tail.segment = last

    def add(self, transcript: Transcript, labels: list[SpeakerLabel] | None = None) -> list[TranscriptSegment]:
        changed: list[TranscriptSegment] = []
        words = list(transcript.words) if transcript.is_final else []
        labels = labels if labels is not None else [self.default_label] * len(words)
        to_stream = self._timeline.to_stream
        for word, label in zip(words, labels, strict=True):
            text = word.text.strip()
            if not text:
                continue
            start = round(to_stream(word.start) + self.offset, 3)
            end = round(to_stream(word.end, is_end=True) + self.offset, 3)
            seg = self._current
            if seg is None or seg.speaker_id != label.speaker_id or seg is not self.tail.segment:
                last = self.tail.segment
                if last is not None and continues(last, label, start):
                    seg = last
                    seg.text = f"{seg.text} {text}"
                    seg.end = max(seg.end, end)
                else:
                    seg_id, self._reserved_id = self._reserved_id or str(uuid.uuid4()), None
                    seg = TranscriptSegment(id=seg_id, text=text, start=start, end=end,
                                            speaker=label.speaker, speaker_id=label.speaker_id,
                                            is_user=label.is_user, person_id=label.person_id)
                    self.segments.append(seg)
                self._current = self.tail.segment = seg
            else:
                seg.text = f"{seg.text} {text}"
                seg.end = max(seg.end, end)
            if not changed or changed[-1] is not seg:
                changed.append(seg)
        if transcript.speech_final:
            self._current = None
        return changed

    def preview(self, transcript: Transcript, label: SpeakerLabel) -> list[TranscriptSegment]:
        """A partial transcript (all of it `label`'s) as the client should show it now: copies, the builder's
        segments unchanged. Its words extend the segment a final would extend (same id), else they make the
        segment whose id the next new segment takes. Segments an earlier partial changed and this one does not
        come back as `settle` gives them."""
        words = [w for w in transcript.words if w.text.strip()]
        shown: list[TranscriptSegment] = []
        if words:
            text = " ".join(w.text.strip() for w in words)
            start = round(self._timeline.to_stream(words[0].start) + self.offset, 3)
            end = round(self._timeline.to_stream(words[-1].end, is_end=True) + self.offset, 3)
            last = self.tail.segment
            if last is not None and continues(last, label, start):
                seg = last.model_copy()
                seg.text, seg.end = f"{seg.text} {text}", max(seg.end, end)
            else:
                self._reserved_id = self._reserved_id or str(uuid.uuid4())
                seg = TranscriptSegment(id=self._reserved_id, text=text, start=start, end=end, speaker=label.speaker,
                                        speaker_id=label.speaker_id, is_user=label.is_user, person_id=label.person_id)
            shown.append(seg)
        gone = [s for s in self._partial_shown.values() if s.id not in {n.id for n in shown}]
        self._partial_shown = {s.id: s for s in shown}
        return shown + self._settled(gone)

    def settle(self, sent: list[TranscriptSegment]) -> list[TranscriptSegment]:
        """After a final: the segments partials changed that the final (`sent`) did not send again, as the client
        must now show them: a stored segment as stored, a segment only a partial made with no text (the final
        dropped its words; `retracted` says which). The next partial starts from a clean slate."""
        gone = [s for s in self._partial_shown.values() if s.id not in {n.id for n in sent}]
        self._partial_shown = {}
        return self._settled(gone)

    def _settled(self, shown: list[TranscriptSegment]) -> list[TranscriptSegment]:
        """Segments shown with partial words, as they are without them."""
        wanted = {s.id for s in shown}
        held = {}
        for seg in reversed(self.segments):  # a partial extends the last segment: found within the last few
            if len(held) == len(wanted):
                break
            if seg.id in wanted:
                held[seg.id] = seg
        if self.tail.segment is not None and self.tail.segment.id in wanted:  # maybe another channel's segment
            held[self.tail.segment.id] = self.tail.segment
        out = []
        for seg in shown:
            if seg.id in held:
                out.append(held[seg.id].model_copy())
            else:  # only ever shown as a partial: emptied in place (`retracted`)
                out.append(seg.model_copy(update={"text": ""}))
        return out

    @staticmethod
    def retracted(segments: list[TranscriptSegment]) -> list[str]:
        """The ids among `settle`/`preview` output that no final holds (sent empty; the app may delete them)."""
        return [s.id for s in segments if not s.text]

    def relabel(self, speaker_id: int, label: SpeakerLabel, recent: int = 200) -> list[TranscriptSegment]:
        """Segments labelled `speaker_id` are now `label` (clusters merged, or a cluster identified): update the
        recent ones, except those the user tagged; the client upserts them by id."""
        changed = []
        new = (label.speaker_id, label.speaker, label.is_user, label.person_id)
        for seg in self.segments[-recent:]:
            if seg.id in self.manual:
                continue
            if seg.speaker_id == speaker_id and (seg.speaker_id, seg.speaker, seg.is_user, seg.person_id) != new:
                seg.speaker_id, seg.speaker, seg.is_user, seg.person_id = new
                changed.append(seg)
        return changed

    def tag(self, segment_ids: list[str], is_user: bool, person_id: str | None) -> list[TranscriptSegment]:
        """The user tagged these segments (those this stream holds) as themselves or a person; kept from now on."""
        wanted = set(segment_ids)
        changed = []
        for seg in self.segments:
            if seg.id in wanted:
                self.manual.add(seg.id)
                if (seg.is_user, seg.person_id) != (is_user, person_id):
                    seg.is_user, seg.person_id = is_user, person_id
                    changed.append(seg)
        return changed
