"""Voice activity detection, one import for the rest of the server. The parts live in their own modules:

- `streaming.vad_backends`: `VadBackend` (frame-level speech probabilities) and `SileroVad`;
- `streaming.vad_pyannote`: `PyannoteVad`;
- `streaming.vad_loading`: `load_vad_backend` and `LazyVadBackend` (`LAZY_MODELS`);
- `streaming.vad_gate`: the live gate, `StreamingVAD` with its padding (`VadParams`, the VAD_* settings), and
  `detect_regions` (the gate over a whole clip);
- `streaming.vad_batch`: `/v1/vad`'s speech as it is, without the gate's padding (`BatchVadParams`, VAD_BATCH_*).
"""

from streaming.vad_backends import SAMPLE_RATE, SileroVad, VadBackend
from streaming.vad_batch import BatchVadParams, batch_regions, regions_from_probs
from streaming.vad_gate import (
    LevelNormalizer,
    SpeechAudio,
    SpeechEnd,
    SpeechStart,
    StreamingVAD,
    VadEvent,
    VadParams,
    detect_regions,
    merged_regions,
    paired_regions,
)
from streaming.vad_loading import LazyVadBackend, load_vad_backend
from streaming.vad_pyannote import PyannoteVad

__all__ = [
    "SAMPLE_RATE", "BatchVadParams", "LazyVadBackend", "LevelNormalizer", "PyannoteVad", "SileroVad", "SpeechAudio",
    "SpeechEnd", "SpeechStart", "StreamingVAD", "VadBackend", "VadEvent", "VadParams", "batch_regions",
    "detect_regions", "load_vad_backend", "merged_regions", "paired_regions", "regions_from_probs",
]
