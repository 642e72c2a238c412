"""Speaker embeddings: the interface (`SpeakerEmbedder`) and the offline default backend, Resemblyzer.

Loaded by `streaming.speaker.load_embedder(settings)`; the SpeechBrain backend is in
`streaming.speechbrain_embedder`.

Two backends, chosen by `SPEAKER_BACKEND`:

- `resemblyzer` (the offline default): Resemblyzer's GE2E LSTM d-vector, 256-d; its weights ship inside the
  `resemblyzer` wheel, so a fresh install works without network.
- `speechbrain` (the production choice): SpeechBrain's ECAPA-TDNN (`speechbrain/spkrec-ecapa-voxceleb`, 192-d) from
  a Hugging Face id (with `HUGGINGFACE_TOKEN` for private repos) or a local directory laid out like that repo.

Both batch for real: `embed_batch` runs the clips of every connection that the model pool gathered in a few forward
passes, and a clip's embedding does not depend on what it was batched with (to 1e-4, float rounding only; see each
backend for how).

Shapes: clips are float mono 16 kHz audio, shape (samples,), any dtype numpy can turn into float32; embeddings are
float32, shape (n_clips, dim), unit L2 norm, compared with a dot product (cosine similarity).

Thread safety: an embedder holds no per-call state (the models are read-only, in eval mode, run under
`torch.inference_mode`), so calls from several threads give correct answers. The model pool still calls
`embed_batch` from its single worker thread only: concurrent calls would just compete for the same cores (or GPU)
and lose the batching. `torch.set_num_threads` is left to the caller.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


# --- embedding backends ----------------------------------------------------------------------------------------


class SpeakerEmbedder(ABC):
    """One speaker embedding per clip. Shared by every connection; holds no per-stream state."""

    name: str  # identifies the embedding space: profiles store it, embeddings of different names never compare
    dim: int  # embedding size
    min_samples: int  # shortest clip (16 kHz samples) that gives a usable embedding; shorter ones are refused

    def check_clip(self, clip: Any) -> np.ndarray:
        """`clip` as contiguous float32 (samples,), or ValueError (not 1-D, shorter than `min_samples`, not finite).

        `embed_batch` checks every clip before any work; the pool may call this per request before batching, so one
        bad clip fails its own request instead of everyone's batch."""
        wav = np.ascontiguousarray(clip, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"a clip must be mono audio of shape (samples,), got shape {wav.shape}")
        if len(wav) < self.min_samples:
            raise ValueError(
                f"clip of {len(wav)} samples ({len(wav) / SAMPLE_RATE:.3f} s) is shorter than the {self.name} "
                f"embedder's minimum of {self.min_samples} samples ({self.min_samples / SAMPLE_RATE:.3f} s)"
            )
        if not np.isfinite(wav).all():
            raise ValueError("clip contains NaN or infinite samples")
        return wav

    def embed_batch(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """clips: float mono 16 kHz, any lengths >= min_samples (float32 preferred; float64 is converted).

        Returns (len(clips), dim) float32, each row L2-normalised; (0, dim) for no clips. Raises ValueError (before
        any model work) when a clip is unusable, see `check_clip`.

        Blocking (a model forward pass): the model pool calls it from its single worker thread, never from the event
        loop. Safe to call from several threads (no per-call state is kept on the embedder), though pointless."""
        checked = self.check_clips(clips)
        if not checked:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self._embed(checked), dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    @abstractmethod
    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """clips: checked float32 (samples,) arrays, at least one. Returns (len(clips), dim), any norm."""

    def check_clips(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`check_clip` on each; the error names the clip."""
        checked = []
        for i, clip in enumerate(clips):
            try:
                checked.append(self.check_clip(clip))
            except ValueError as e:
                raise ValueError(f"clip {i}: {e}") from None
        return checked

    def warm_up(self) -> None:
        """One call on dummy audio so the first user does not pay for lazy compilation and allocation."""
        rng = np.random.default_rng(0)
        clips = [0.05 * rng.standard_normal(n).astype(np.float32) for n in (2 * SAMPLE_RATE, self.min_samples)]
        self.embed_batch(clips)


_INT16_MAX = 2**15 - 1  # resemblyzer.audio.int16_max
_TARGET_DBFS = -30  # resemblyzer.hparams.audio_norm_target_dBFS: preprocess_wav's volume target (raised only)


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (x86 AVX512_BF16 or AMX_BF16), and the evidence, in words.

    The check is `torch.cpu.get_capabilities()` (public in recent torch, the project pins 2.14: CPUID read by the
    cpuinfo library that torch's own kernel dispatch uses, so it works on any OS and inside containers), falling
    back to the `avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo on Linux with an older torch. Not
    `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: oneDNN says yes on any AVX512 (avx512_core) CPU, where it
    emulates bf16 with fp32 instructions (slower, not faster). ARM64's bf16 (BFMMLA) is left out: torch's bf16 LSTM
    there is unmeasured, so `auto` stays float32 on ARM (set SPEAKER_PRECISION=bfloat16 to try it)."""
    flags = ("avx512_bf16", "amx_bf16")
    try:
        import torch

        caps = torch.cpu.get_capabilities()
    except (AttributeError, ImportError, RuntimeError):
        caps = None
    if caps is not None:
        found = [f for f in flags if caps.get(f)]
        return bool(found), f"torch.cpu.get_capabilities(): {', '.join(found) or 'no avx512_bf16 / amx_bf16'}"
    try:
        words = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    except (OSError, IndexError):
        return False, "CPU capabilities unknown (no torch.cpu.get_capabilities, no /proc/cpuinfo flags)"
    found = [f for f in flags if f in words]
    return bool(found), f"/proc/cpuinfo: {', '.join(found) or 'no avx512_bf16 / amx_bf16'}"


def resolve_speaker_precision(precision: str, device_type: str) -> tuple[str, str]:
    """`SPEAKER_PRECISION` for a model on `device_type` ("cpu", "cuda"): ("float32" | "bfloat16", why).

    "float32" and "bfloat16" are taken as they are, on any device (bf16 on CUDA is unmeasured). "auto" is bfloat16
    on a CPU with native bf16 (`cpu_native_bf16`), else float32: on a CPU without it oneDNN emulates bf16 (slower),
    and on CUDA bf16/fp16 is unmeasured here (and a GPU is not where the embeddings' cost matters)."""
    if precision in ("float32", "bfloat16"):
        return precision, "as set"
    if precision != "auto":
        raise ValueError(f"unknown SPEAKER_PRECISION {precision!r} (auto, float32 or bfloat16)")
    if device_type != "cpu":
        return "float32", f"auto on {device_type}: float32 (bf16 measured on CPU only)"
    native, evidence = cpu_native_bf16()
    return ("bfloat16" if native else "float32"), f"auto on cpu, {evidence}"


@functools.lru_cache(maxsize=1024)
def _partial_starts(slices, n_samples: int, rate: float, min_coverage: float) -> tuple[int, ...]:
    """`VoiceEncoder.compute_partial_slices` (passed as `slices`)'s partial start frames, cached per clip length:
    live windows all have one of a few lengths."""
    _, mel_slices = slices(n_samples, rate, min_coverage)
    return tuple(s.start for s in mel_slices)


class ResemblyzerEmbedder(SpeakerEmbedder):
    """Resemblyzer's `VoiceEncoder` (a 3-layer LSTM over 40-band mel frames, 256-d output), batched across clips.

    Per clip this is `VoiceEncoder.embed_utterance(normalize_volume(clip, -30, increase_only=True))` (to float
    rounding, 1e-6 measured): the volume normalisation of `preprocess_wav`, but not its webrtcvad silence trimming
    (our clips are already speech, cut by our VAD). `embed_utterance` cuts a clip's mel spectrogram into 1.6 s partial
    windows (160 frames, 1.3 per second, the last one kept if it is at least 75 % covered, zero-padded), runs them
    through the LSTM and averages the partial embeddings. Here the partials of ALL clips of a call are stacked into
    forward passes of up to `max_partials` rows, then averaged per clip. The LSTM treats rows independently, so
    batching is exact up to float rounding (< 1e-6 measured).

    The front end is vectorised over the whole call instead of resemblyzer's per-clip `wav_to_mel_spectrogram`
    (librosa's `melspectrogram`, which rebuilds the mel filterbank on every call): the clips, volume-normalised,
    are laid out in one zero-padded buffer whose segments start on the 10 ms frame grid, so one strided framing, one
    batched FFT and one matrix product with a filterbank built at init give every clip's frames; then one gather
    cuts the partials. It is librosa's computation step for step (periodic Hann window, `center=True` with zero
    padding, power 2, Slaney mel filters, float64 FFT rounded to complex64), equal to `wav_to_mel_spectrogram` to
    float rounding (1e-9 relative), except that the filterbank product is computed in float64 and rounded to float32:
    a float32 GEMM rounds a row differently depending on how many rows it is multiplied with, and a 1-ulp difference
    in the LSTM's input can flip one bf16 rounding (up to 3e-3 in the embedding) in `bfloat16`; so a clip's mel
    frames are bitwise the same whatever it is batched with (+0.03 ms a clip). Frames that lie wholly in a partial's
    zero padding (a 1.2 s window fills only 122 of its partial's 160 frames) are exactly zero there too and are not
    computed.

    Cost (one core, batches of 32 live 1.2 s windows, 4.6 ms a window): the LSTM is ~93 % of it (~4.3 ms a partial
    with oneDNN, about the core's fp32 peak; a row costs about the same at batch 8 or 128), the front end 0.26 ms a
    clip (~0.29 with the float64 filterbank product; librosa's took ~0.8 ms, mostly Python holding the GIL; py-spy:
    22 % of embed_batch's samples held the GIL before, 1.4 % now). The LSTM runs all 160 steps of a partial even for
    a 1.2 s clip: that is what resemblyzer was trained and enrolled with (bench/speaker_calibration.py --no-pad
    measures the alternative).

    Precision (`SPEAKER_PRECISION`, `resolve_speaker_precision`; default auto): "bfloat16" converts the LSTM's
    weights to bf16 once and runs it on bf16 mel input (oneDNN's bf16 LSTM); the mel front end, the linear layer,
    the partial average and the output stay float32. Measured on this CPU (AVX512_BF16, no AMX; one thread):
    - speed: the LSTM 1.85x faster (2.3 vs 4.3 ms a partial at batch 32); a live 1.2 s window through the pool
      2.7-2.8 vs 4.6 ms at batch 32, 2.9 vs 5.1-5.6 at 8, 3.1-3.4 vs 5.3-5.8 at 4, 8.4-8.9 vs 10.5-11.4 alone
      (bench/embeddings.py --seconds 1.2 --threads 1 --precision ..., two runs on the shared machine).
      Converting the weights beat `torch.autocast` (which re-casts them on every call: +0.6 ms a call at batch 1)
      at the same rounding; a bf16 linear layer bought nothing (0.03 % of the work).
    - drift on the 419 live windows of sample.wav + 9 AMI files: up to 0.026 per component, cosine to float32
      >= 0.9955 (mean 0.9991); each speaker's centroid of those windows >= 0.9978 (mean 0.9995); enrolled
      profile centroids 0.9997-0.9999 (bench/speaker_calibration.py --reference-precision float32).
    - decisions: matching accuracy the same (0.857), also with profiles enrolled in the other precision; live
      clustering agreement 0.882 instead of 0.902 at the server's thresholds: one file (trn05, 0.98 -> 0.80) whose
      online cluster history flips. Random noise of bf16's size added to the float32 embeddings flips it too, in 5 of
      30 draws (a fragile optimum on 5 minutes of audio rather than a clearly worse embedding); the end-to-end
      speaker tests score the same in both (sample.wav labels 0.844 fp32 / 0.845 bf16, trn07 -> trn08 0.80 both).
    - capacity: at 100 live streams on 2 cores the speaker worker needs 0.43 cores in bf16 against 0.67 in fp32,
      and only with bf16 is the p95 of our latency under 300 ms (bench/RESULTS.md). So the default is `auto`;
      `float32` buys back the last 0.02 of clustering agreement on the calibration set.
    The name stays "resemblyzer" in both precisions: profiles enrolled in one are matched by the other (above).

    `min_samples` = 0.75 s. Shorter clips are zero-padded to one 1.6 s partial, and the LSTM's final state then
    follows more padding than speech. Measured on sample.wav's two speakers (clips cut from single-speaker turns,
    each matched against the speakers' centroids from their other turns): right speaker for 68 % of 0.3 s clips,
    86 % at 0.5 s, 92 % at 0.75 s, 94 % at 1.0 s, 100 % from 1.6 s. 0.75 s is also below the live tagger's shortest
    window (0.8 s).
    """

    name = "resemblyzer"
    dim = 256
    min_samples = int(0.75 * SAMPLE_RATE)
    rate = 1.3  # partial windows per second (embed_utterance's default)
    min_coverage = 0.75  # keep the last partial if this much of it is audio (embed_utterance's default)
    mel_block_frames = 4096  # frames per FFT block: bounds the float64 temporaries (~13 + 7 MB) for long clips

    def __init__(self, device: str = "cpu", max_partials: int = 256, precision: str = "float32") -> None:
        """`precision`: "float32", "bfloat16" or "auto" (see `resolve_speaker_precision`): the LSTM's dtype."""
        import torch

        with warnings.catch_warnings():  # webrtcvad (imported by resemblyzer.audio) warns about pkg_resources
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import librosa
            from resemblyzer import VoiceEncoder, hparams

        self._torch = torch
        self.device = torch.device(device)
        self.max_partials = max_partials
        self._encoder = VoiceEncoder(self.device, verbose=False).eval().requires_grad_(False)
        self.precision, why = resolve_speaker_precision(precision, self.device.type)
        if self.precision == "bfloat16":  # the LSTM's weights (and so its states and gates) in bf16, the rest fp32
            self._encoder.lstm.to(torch.bfloat16)
        self._lstm_dtype = self._encoder.lstm.weight_ih_l0.dtype
        # resemblyzer.audio.wav_to_mel_spectrogram's parameters, and librosa's defaults for the rest
        sr = hparams.sampling_rate
        assert sr == SAMPLE_RATE
        self._n_fft = int(sr * hparams.mel_window_length / 1000)  # 400 samples (25 ms)
        self._hop = int(sr * hparams.mel_window_step / 1000)  # 160 samples (10 ms)
        self._partial_frames = hparams.partials_n_frames  # 160
        self._window = librosa.filters.get_window("hann", self._n_fft, fftbins=True)  # float64, as librosa's stft
        self._mel_basis = np.ascontiguousarray(  # (n_fft // 2 + 1, 40) float32
            librosa.filters.mel(sr=sr, n_fft=self._n_fft, n_mels=hparams.mel_n_channels, dtype=np.float32).T
        )
        self._mel_basis64 = self._mel_basis.astype(np.float64)  # the same values, for the float64 product
        self._slices = VoiceEncoder.compute_partial_slices
        log.info("resemblyzer speaker embedder on %s, LSTM in %s (SPEAKER_PRECISION=%s: %s)",
                 self.device, self.precision, precision, why)

    def partial_starts(self, n_samples: int) -> tuple[int, ...]:
        """First mel frame of each 160-frame partial of an n_samples clip, as `embed_utterance` cuts it."""
        return _partial_starts(self._slices, n_samples, self.rate, self.min_coverage)

    @staticmethod
    def volume_gain(wav: np.ndarray) -> np.float32:
        """The factor `normalize_volume(wav, -30, increase_only=True)` multiplies float32 `wav` by, computed as it
        does (float32); 1 for digital silence, which it would turn into NaN."""
        rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
        if not rms > 0:
            return np.float32(1.0)
        change = _TARGET_DBFS - 20 * np.log10(rms / _INT16_MAX)
        return np.float32(10 ** (change / 20)) if change > 0 else np.float32(1.0)

    def mel_frames(self, clips: Sequence[np.ndarray], n_frames: Sequence[int],
                   gains: Sequence[np.float32] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mel frames 0..n_frames[i]-1 of each float32 clip, times gains[i] (if given) first, in one
        (total + 1, 40) float32 array whose last row is zeros, and the row of each clip's frame 0: frame t of clip i
        is row first[i] + t. A clip is zero-extended on both sides, so these are the frames of librosa's centred STFT
        of the clip followed by any zero padding (`wav_to_mel_spectrogram(np.pad(clip, (0, k)))[:n_frames]`)."""
        hop, n_fft = self._hop, self._n_fft
        half = n_fft // 2
        tail = -(-(n_fft - hop) // hop)  # frames a segment needs beyond its own so its last frame fits
        seg = np.array([n + tail for n in n_frames], np.int64)
        first = np.concatenate([[0], np.cumsum(seg)[:-1]])
        buf = np.zeros(int(seg.sum()) * hop, np.float32)
        for i, (clip, n, f) in enumerate(zip(clips, n_frames, first, strict=True)):
            m = min(len(clip), hop * (n - 1) + half)  # the samples frames 0..n-1 reach
            start = int(f) * hop + half
            if gains is None:
                buf[start : start + m] = clip[:m]
            else:
                np.multiply(clip[:m], gains[i], out=buf[start : start + m])  # as normalize_volume: float32
        frames = sliding_window_view(buf, n_fft)[::hop]  # (G, n_fft) view: frame j starts at sample j * hop
        mel = np.empty((len(frames) + 1, self._mel_basis.shape[1]), np.float32)
        for a in range(0, len(frames), self.mel_block_frames):
            block = frames[a : a + self.mel_block_frames]
            spec = np.fft.rfft(block * self._window, axis=-1).astype(np.complex64)  # as librosa's stft
            # float64 product, rounded to float32: float32 GEMM (OpenBLAS) rounds a row differently depending on how
            # many rows it is multiplied with (1e-9 here), which bf16 rounding of the LSTM input can blow up to
            # 3e-3 in the embedding; in float64 the rounded result is the same whatever the batch
            mel[a : a + len(block)] = np.matmul((np.abs(spec) ** 2).astype(np.float64), self._mel_basis64)
        mel[-1] = 0.0
        return mel, first

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        hop, half, width = self._hop, self._n_fft // 2, self._partial_frames
        starts = [self.partial_starts(len(c)) for c in clips]
        gains = [self.volume_gain(c) for c in clips]
        # Frames each clip needs: up to the end of its last partial, but those wholly past its audio are zeros.
        n_frames = [min(s[-1] + width, (len(c) + half + hop - 1) // hop) for c, s in zip(clips, starts, strict=True)]
        mel, first = self.mel_frames(clips, n_frames, gains)
        counts = np.array([len(s) for s in starts])
        owner = np.repeat(np.arange(len(clips)), counts)
        t = np.concatenate(starts)[:, None] + np.arange(width)  # (partials, 160) frame of each partial step
        rows = np.where(t < np.array(n_frames)[owner, None], first[owner, None] + t, len(mel) - 1)
        out = np.empty((len(rows), self.dim), np.float32)
        for s in range(0, len(rows), self.max_partials):
            out[s : s + self.max_partials] = self.forward_partials(mel[rows[s : s + self.max_partials]])
        sums = np.add.reduceat(out, np.concatenate([[0], np.cumsum(counts)[:-1]]), axis=0)
        return sums / counts[:, None].astype(np.float32)

    def forward_partials(self, mels: np.ndarray) -> np.ndarray:
        """`VoiceEncoder.forward` on (b, frames, 40) float32 mel partials: (b, 256) float32, unit norm each (all
        zeros after the ReLU gives NaN, as resemblyzer's). The LSTM runs in `precision` (its input cast to it); the
        last layer's final hidden state is cast back to float32 for the linear layer, ReLU and normalisation.

        In bfloat16 a lone row is run as two (itself twice): oneDNN's bf16 LSTM rounds a batch of one differently
        from any larger batch (up to 3.5e-3 per component, measured; batches of 2 to 420 rows agree to 2e-7), so
        without this a 1.2 s window embedded alone would differ from the same window in a pool batch. It costs
        ~2.4 ms on such a call (7.8 instead of 5.4 ms; fp32's lone row takes 9.8), and nothing once the pool
        batches."""
        torch = self._torch
        n = len(mels)
        if n == 1 and self._lstm_dtype != torch.float32:
            mels = np.concatenate([mels, mels])
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(mels, np.float32)).to(self.device, self._lstm_dtype)
            _, (hidden, _) = self._encoder.lstm(x)
            raw = self._encoder.relu(self._encoder.linear(hidden[-1].float()))
            return (raw / torch.norm(raw, dim=1, keepdim=True))[:n].cpu().numpy()
