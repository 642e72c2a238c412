"""The SpeechBrain speaker embedding backend (`SPEAKER_BACKEND=speechbrain`, the production choice): ECAPA-TDNN
from a Hugging Face id or a local directory. Interface and shapes: `streaming.embedders`."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from streaming.embedders import SAMPLE_RATE, SpeakerEmbedder
from streaming.model_source import hub_cache_dir, hub_offline, looks_like_local_path, redactor, split_revision

log = logging.getLogger(__name__)


class SpeechBrainEmbedder(SpeakerEmbedder):
    """A SpeechBrain `EncoderClassifier` (ECAPA-TDNN `speechbrain/spkrec-ecapa-voxceleb` in production), batched.

    The embedding is `encode_batch(..., normalize=False)` (as SpeechBrain's own verification does), L2-normalised.

    Batching: clips are sorted by length and zero-padded into batches (at most `max_batch` clips and
    `max_batch_samples` padded samples each) with their lengths passed on, so the sentence mean normalisation,
    squeeze-excitation means and attentive statistics pooling all ignore the padding. That alone is not exact:
    ECAPA's convolutions pad with reflection at the end of the tensor, so a clip's last frames would see the
    reflection of its own audio when alone but the zeros after it when padded in a batch (up to 7e-2 difference in
    an embedding component measured on the test's small ECAPA). So every clip, alone or batched, is followed by at
    least `tail_pad_samples` of zeros (0.75 s, 75 frames), more than the frame-level receptive field of ECAPA-TDNN
    (kernel 5, then Res2Net blocks of 7 chained k=3 convs at dilations 2, 3, 4: +-65 frames): a clip's valid frames
    then see the same inputs in any batch, and its embedding no longer depends on its batch mates (to float
    rounding, 2e-7 measured). The influence of far frames fades fast (a 0.1 s pad already gives 7e-6 on the test
    model), so `tail_pad_samples` may be lowered to save compute at the cost of strict exactness; a model with a
    wider receptive field needs more. Relative lengths are passed as (valid frames - 0.5) / frames so SpeechBrain's
    two mask conventions (`round` and `<`) agree on the count. Because of the pad, embeddings differ slightly from
    `encode_batch` on the bare clip; every embedding here (enrolment and live) goes through the same code.

    `min_samples` = 0.5 s (50 frames for the statistics pooling); ECAPA was trained on 2-3 s crops and short clips
    degrade quickly below that (no weights here to measure with, see the resemblyzer numbers for the trend).
    """

    min_samples = int(0.5 * SAMPLE_RATE)

    def __init__(
        self,
        classifier: Any,
        name: str = "speechbrain",
        tail_pad_samples: int = int(0.75 * SAMPLE_RATE),
        max_batch: int = 64,
        max_batch_samples: int = 240 * SAMPLE_RATE,
    ) -> None:
        import torch

        self._torch = torch
        self._model = classifier.eval()
        self.device = torch.device(getattr(classifier, "device", "cpu"))
        self.name = name
        self.tail_pad_samples = tail_pad_samples
        self.max_batch = max_batch
        self.max_batch_samples = max_batch_samples
        mods = classifier.mods
        self._features, self._norm, self._encoder = mods.compute_features, mods.mean_var_norm, mods.embedding_model
        # Feature hop and embedding size, measured: any Fbank/MFCC front end and any encoder work.
        with torch.inference_mode():
            n1 = self._features(torch.zeros((1, SAMPLE_RATE), device=self.device)).shape[1]
            n2 = self._features(torch.zeros((1, 2 * SAMPLE_RATE), device=self.device)).shape[1]
        self._hop = SAMPLE_RATE / (n2 - n1)
        self.dim = 0
        self.dim = int(self._run([np.full(SAMPLE_RATE, 1e-3, np.float32)]).shape[1])

    @classmethod
    def load(cls, source: str, savedir: Path, token: str | None = None, device: str = "cpu",
             cache_dir: str | Path | None = None) -> SpeechBrainEmbedder:
        """`source`: a Hugging Face id ("speechbrain/spkrec-ecapa-voxceleb", optionally "@revision") or a local
        directory laid out like that repo (hyperparams.yaml, embedding_model.ckpt, mean_var_norm_emb.ckpt, ...).

        Files are collected (as symlinks) under `savedir`. A local directory never touches the network: downloads are
        disabled for it, and a `pretrained_path` key in its hyperparams.yaml (the HF repos point it at the HF id) is
        overridden with the directory itself. A Hugging Face id is downloaded once into the hub cache `cache_dir`
        (MODEL_CACHE_DIR; None: the hub's default) and linked from `savedir`; later loads use `savedir`.

        Raises ValueError for a local path that is not there or has no hyperparams.yaml, RuntimeError when loading
        fails (no network, gated/private repo without a token, a bad file); messages name the source, never the token.
        """
        path = Path(source).expanduser()
        overrides: dict[str, str] = {}
        revision = None
        local = path.is_dir()
        if local:
            yaml_path = path / "hyperparams.yaml"
            if not yaml_path.is_file():
                raise ValueError(f"speechbrain model directory {source!r} has no hyperparams.yaml")
            if re.search(r"^pretrained_path\s*:", yaml_path.read_text(encoding="utf-8"), re.MULTILINE):
                overrides["pretrained_path"] = str(path.resolve())
            fetch_source = str(path.resolve())
        elif looks_like_local_path(source):
            raise ValueError(f"speechbrain model directory {source!r} not found")
        else:
            fetch_source, revision = split_revision(source)

        scrub = redactor(token)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                from speechbrain.inference.speaker import EncoderClassifier
                from speechbrain.utils.fetching import FetchConfig

            if local:  # re-link every load (the directory may have changed) and never download
                fetch_config = FetchConfig(overwrite=True, allow_network=False)
            else:
                fetch_config = FetchConfig(allow_network=not hub_offline(), token=token or None, revision=revision,
                                           huggingface_cache_dir=str(hub_cache_dir(cache_dir)) if cache_dir else None)
            classifier = EncoderClassifier.from_hparams(
                source=fetch_source,
                savedir=str(savedir),
                overrides=overrides,
                run_opts={"device": "cuda:0" if device == "cuda" else device},  # speechbrain wants an index
                fetch_config=fetch_config,
            )
        except Exception as e:
            hint = (
                ""
                if local
                else " (without network, download it beforehand or point SPEECHBRAIN_MODEL at a local directory)"
            )
            raise RuntimeError(
                scrub(f"could not load speechbrain model {source!r}: {type(e).__name__}: {e}{hint}")
            ) from e
        if classifier is None:
            raise RuntimeError(f"could not load speechbrain model {source!r}")
        log.info("speechbrain speaker embedder %s on %s", source, device)
        return cls(classifier, name=speechbrain_name(source))

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(clips), self.dim), np.float32)
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        group: list[int] = []
        for i in order:  # ascending lengths: the last clip of a group sets its padded length
            width = len(clips[i]) + self.tail_pad_samples
            if group and (len(group) >= self.max_batch or (len(group) + 1) * width > self.max_batch_samples):
                out[group] = self._run([clips[j] for j in group])
                group = []
            group.append(i)
        out[group] = self._run([clips[j] for j in group])
        return out

    def _run(self, clips: list[np.ndarray]) -> np.ndarray:
        """One forward pass: (len(clips), dim) raw embeddings."""
        torch = self._torch
        width = max(len(c) for c in clips) + self.tail_pad_samples
        wavs = np.zeros((len(clips), width), np.float32)
        for row, c in zip(wavs, clips, strict=True):
            row[: len(c)] = c
        with torch.inference_mode():
            feats = self._features(torch.from_numpy(wavs).to(self.device))
            n_frames = feats.shape[1]
            valid = [min(n_frames, int(len(c) / self._hop) + 1) for c in clips]  # the frames the clip alone has
            lens = torch.tensor([(v - 0.5) / n_frames for v in valid], dtype=torch.float32, device=self.device)
            feats = self._norm(feats, lens)
            emb = self._encoder(feats, lens)
        return emb.reshape(len(clips), -1).float().cpu().numpy()


def speechbrain_name(source: str) -> str:
    """The name a SpeechBrain model's embeddings are recorded with: "speechbrain:<HF id>" or "speechbrain:<local
    directory's name>" (known before the model is loaded)."""
    path = Path(source).expanduser()
    return f"speechbrain:{path.resolve().name if path.is_dir() else source}"
