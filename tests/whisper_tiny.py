"""A tiny random Whisper model in faster-whisper's format, built offline (no weights can be downloaded here).

`build_tiny_whisper(out_dir)` trains a byte-level BPE on a few sentences, adds Whisper's special tokens in Whisper's
order (text tokens, `<|endoftext|>`, `<|startoftranscript|>`, the language tokens, `<|translate|>`,
`<|transcribe|>`, `<|startoflm|>`, `<|startofprev|>`, `<|nocaptions|>`, `<|notimestamps|>`, then the timestamps
`<|0.00|>` .. `<|30.00|>`: faster-whisper takes `<|notimestamps|>` + 1 as the first timestamp and every id below
`<|endoftext|>` as text), makes a `WhisperForConditionalGeneration` with d_model 64 and 2 layers from a fixed seed,
saves both with transformers and converts them with CTranslate2's `TransformersConverter`, then copies
`tokenizer.json` and `preprocessor_config.json` beside `model.bin` as faster-whisper expects.

A random decoder rarely ends a transcript (its `<|endoftext|>` is as likely as any of a few hundred tokens, so
every region would run to the length limit) and emits word-boundary tokens by chance. The output layer (untied from the
token embeddings) is therefore shifted: `<|endoftext|>` gets a fixed logit offset `EOT_BIAS` so a transcript ends
after a few words, and the other special tokens are pushed down so text comes out. The text is still random and
still depends on the audio (the cross-attention is untouched): the tests check plumbing, never words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# faster-whisper's language codes (faster_whisper.tokenizer._LANGUAGE_CODES): a multilingual tokenizer must know each
LANGUAGES = (
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu hy id "
    "is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro ru sa sd si "
    "sk sl sn so sq sr su sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue"
).split()

SENTENCES = (
    "hello this is a test of the speech recognizer",
    "the quick brown fox jumps over the lazy dog",
    "i am originally from chicago and now i live in new jersey",
    "well there is not that much difference at least you know",
    "speech to text on every stream of the server batched together",
    "one two three four five six seven eight nine ten",
)

TEXT_VOCAB = 300  # BPE vocabulary (bytes and merges) before the special tokens
OUTPUT_STD = 0.4  # the untied output layer's weights: random logits of std ~3 (not ~0.15), text varies with audio
EOT_BIAS = -6.0  # <|endoftext|>'s logit offset at the first text position (via the output layer) ...
EOT_GROWTH = 3.0  # ... and its rise per decoded token: a transcript ends after a handful of words
BYTE_PENALTY = -6.0  # single-byte tokens: merged (whole-word) tokens come out, which decode to valid text
CROSS_ATTENTION_GAIN = 10.0  # on the decoder's cross-attention value and output weights: the audio steers the text
SPECIAL_PENALTY = -20.0  # the other special tokens' logits: text comes out, not task or language tokens


def special_tokens(multilingual: bool) -> list[str]:
    languages = LANGUAGES if multilingual else ("en",)
    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in languages), "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
            *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]


def _tokenizer(multilingual: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TEXT_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" " + s for s in SENTENCES], trainer)
    tok.add_special_tokens(special_tokens(multilingual))
    return tok


def build_tiny_whisper(out_dir: Path, multilingual: bool = False, seed: int = 0) -> Path:
    """Builds the model under `out_dir` (the CTranslate2 model in `out_dir / "ct2"`, returned). A few seconds."""
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import (
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    hf_dir, ct2_dir = out_dir / "hf", out_dir / "ct2"
    tok = _tokenizer(multilingual)
    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")}
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    languages = LANGUAGES if multilingual else ("en",)
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, suppress_tokens=[], begin_suppress_tokens=[eot],
        tie_word_embeddings=False,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.model.decoder.layers:  # random init leaves the audio's influence ~1% of the token's
            layer.encoder_attn.v_proj.weight.mul_(CROSS_ATTENTION_GAIN)
            layer.encoder_attn.out_proj.weight.mul_(CROSS_ATTENTION_GAIN)
        out = model.proj_out.weight  # the output layer (untied: scaling the input embeddings made loops)
        out.normal_(0.0, OUTPUT_STD)
        # The decoder's last layer norm ends in a bias; a token's logit gains <output row, bias>. Pinning one
        # coordinate of the norm's output to 1 and setting that column per token shifts its logit by a constant.
        norm = model.model.decoder.layer_norm
        norm.weight[0] = 0.0
        norm.bias[0] = 1.0
        out[:, 0] = 0.0
        out[:256, 0] = BYTE_PENALTY  # the BPE's byte alphabet comes first
        out[eot + 1 :, 0] = SPECIAL_PENALTY
        out[eot, 0] = EOT_BIAS
        # Position: coordinate 1 of the learned position embedding grows with the step (no token embedding writes
        # it); the final norm passes it on, and <|endoftext|>'s output row reads it, so ending grows more likely.
        positions = model.model.decoder.embed_positions.weight
        positions[:, 1] = torch.arange(positions.shape[0], dtype=positions.dtype) * EOT_GROWTH
        model.model.decoder.embed_tokens.weight[:, 1] = 0.0
        norm.weight[1], norm.bias[1] = 1.0, 0.0
        out[:, 1] = 0.0
        out[eot, 1] = 1.0
    model.generation_config.lang_to_id = {f"<|{c}|>": tok.token_to_id(f"<|{c}|>") for c in languages}
    model.generation_config.no_timestamps_token_id = no_ts
    model.save_pretrained(hf_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(hf_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)
    if ct2_dir.exists():
        shutil.rmtree(ct2_dir)
    TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization="float32")
    shutil.copy(hf_dir / "tokenizer.json", ct2_dir / "tokenizer.json")
    shutil.copy(hf_dir / "preprocessor_config.json", ct2_dir / "preprocessor_config.json")
    (out_dir / "built.json").write_text(json.dumps({"vocab": vocab, "multilingual": multilingual, "seed": seed}))
    return ct2_dir
