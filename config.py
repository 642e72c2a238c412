"""All settings of the server, read from the environment and `.env` (one pydantic-settings class).

Every key here is listed with a comment in `.env.template`. Names kept from the Omi seed and its migration guide
where they exist (`DATABASE_CHOICE`, `POSTGRES_URL`, `DEEPGRAM_API_KEY`, `HUGGINGFACE_TOKEN`, `ADMIN_KEY`,
`SERVICE_ACCOUNT_JSON`, `HTTP_GET_TIMEOUT`, `HTTP_PUT_TIMEOUT`, models cached under `./pretrained_models`,
`LAZY_MODELS`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ADMIN_KEY_MIN_CHARS = 32


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting's error never repeats its value (it may be a secret such as ADMIN_KEY)
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True,
                                      hide_input_in_errors=True)

    # --- storage (issue 4 builds the backends; the choice and paths live here already) ---
    database_choice: Literal["sqlite", "postgres", "firestore"] = "sqlite"
    data_dir: Path = Path("data")
    sqlite_path: Path | None = None  # default: DATA_DIR/omi.sqlite3
    postgres_url: SecretStr | None = None

    # --- auth ---
    # A prefix of the credential ("<ADMIN_KEY><uid>"): at least ADMIN_KEY_MIN_CHARS, else the server refuses to start
    admin_key: SecretStr | None = None
    firebase_credentials: Path | None = None  # service-account JSON file; enables Firebase ID token verification
    # Omi's name: the service account's JSON text itself (or a path to it), as Omi's backend reads it
    service_account_json: SecretStr | None = None
    firebase_project_id: str | None = None  # alternative to a credentials file (uses application default creds)
    # Internal callers (Omi's backend calls /v1/speaker-identification?uid= with no user token): a shared secret
    # sent as "X-Internal-Key", and/or networks (CIDRs) trusted as internal. Neither set: no internal callers.
    internal_api_key: SecretStr | None = None
    internal_networks: str = ""  # comma-separated CIDRs, e.g. "10.0.0.0/8,fd00::/8"; empty: none

    # --- models ---
    model_device: Literal["auto", "cpu", "cuda"] = "auto"
    huggingface_token: SecretStr | None = None
    vad_backend: Literal["silero", "pyannote"] = "silero"
    pyannote_segmentation: str = "pyannote/segmentation-3.0"  # Hugging Face id or local checkpoint path
    speaker_backend: Literal["resemblyzer", "speechbrain"] = "resemblyzer"
    speechbrain_model: str = "speechbrain/spkrec-ecapa-voxceleb"  # Hugging Face id or local directory
    # resemblyzer's LSTM dtype. auto: bfloat16 on a CPU with native bf16 (AVX512_BF16/AMX_BF16), else float32 (and
    # on CUDA). bf16: 1.7x faster a window, cosine >= 0.995 to fp32; what it costs in agreement: speaker.py
    speaker_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    lazy_models: bool = False  # load models on first use instead of at start-up
    # Where Hugging Face models (pyannote, speechbrain) are downloaded to and found again (Omi: ./pretrained_models)
    model_cache_dir: Path = Path("pretrained_models")
    # torch intra-op threads per model call (0: torch's default, one per core). 1 on CPU: under many streams the
    # parallelism comes from batching and threads, and idle OpenMP threads spin (bench/RESULTS.md: 40% less CPU).
    torch_threads: int = Field(default=1, ge=0)

    # --- the shared model pool ---
    pool_max_batch: int = 32
    pool_max_wait_ms: float = 10.0
    pool_queue_size: int = 2048
    # The speaker pool's batch worker (/v1/speaker-identification's clips): its own thread at the lowest priority,
    # model calls of POOL_BATCH_MAX_BATCH clips; its queue never counts as live saturation. A request submits
    # 2 x POOL_BATCH_MAX_BATCH clips at a time: the queue holds that for POOL_BATCH_QUEUE_SIZE / (2 x
    # POOL_BATCH_MAX_BATCH) requests at once; beyond, 503 with Retry-After.
    pool_batch_queue_size: int = Field(default=64, ge=1)
    pool_batch_max_batch: int = Field(default=4, ge=1)
    # The live streams' VAD: every stream's new frames scored together, one model call per 32 ms step.
    vad_max_batch: int = Field(default=512, ge=1)
    vad_max_wait_ms: float = Field(default=10.0, ge=0)
    # Where the VAD and speaker models run: "local", this process's pool (streaming/pool.py); "ray", Ray Serve
    # deployments (streaming/ray_deployments.py) shared by every front-end process that names the same RAY_ADDRESS.
    model_pool: Literal["local", "ray"] = "local"
    ray_address: str = ""  # a running Ray cluster ("ray://host:10001", "auto"); empty: start a local one (tests, dev)
    ray_replicas: int = Field(default=1, ge=1)  # replicas of each model deployment (the first front-end deploys them)
    ray_gpu_fraction: float = Field(default=0.25, ge=0, le=1)  # GPU per replica when MODEL_DEVICE resolves to cuda
    ray_cpus_per_replica: float = Field(default=1.0, ge=0)  # CPU Ray reserves per replica (scheduling only)
    ray_max_batch: int = Field(default=16, ge=1)  # @serve.batch: front-end calls merged into one model call ...
    ray_batch_wait_ms: float = Field(default=2.0, ge=0)  # ... gathered for at most this long
    ray_call_timeout_s: float = Field(default=30.0, gt=0)  # one call to a deployment; beyond, its requests fail

    # --- streaming VAD (defaults tuned on the AMI excerpts, see README "Voice activity detection") ---
    vad_onset: float = 0.4
    vad_offset: float = 0.3
    vad_pre_roll_ms: int = 200
    vad_hangover_ms: int = 400
    vad_min_speech_ms: int = 100
    vad_max_speech_s: float = 30.0
    vad_normalize: bool = False
    # /v1/vad's speech as it is (streaming/vad_batch.py), without the live gate's padding; chosen by leave-one-
    # meeting-out cross-validation on the AMI excerpts (README "Voice activity detection", bench/vad_der.py).
    vad_batch_onset: float = Field(default=0.15, ge=0, le=1)
    vad_batch_offset: float = Field(default=0.15, ge=0, le=1)
    vad_batch_min_speech_ms: int = Field(default=250, ge=0)
    vad_batch_min_silence_ms: int = Field(default=1100, ge=0)
    vad_batch_pad_ms: int = Field(default=125, ge=0)
    vad_batch_smooth_frames: int = Field(default=1, ge=1)

    # --- speech to text ---
    # None: deepgram when a key is set, else local
    stt_backend: Literal["deepgram", "local", "openai", "whisper"] | None = None
    deepgram_api_key: SecretStr | None = None
    deepgram_url: str = "https://api.deepgram.com"
    deepgram_model: str = "nova-3"
    deepgram_keepalive_s: float = 5.0
    stt_send_chunk_ms: float = Field(default=100.0, ge=0)  # speech audio per Deepgram message (a region's end: at once)
    stt_replay_buffer_s: float = Field(default=60.0, gt=0)  # unacknowledged speech held per stream for a replay
    stt_reconnect_base_s: float = Field(default=0.25, gt=0)  # first backoff step after a dropped STT socket
    stt_reconnect_max_s: float = Field(default=8.0, gt=0)  # backoff cap
    stt_reconnect_max_failures: int = Field(default=8, ge=1)  # quick failures in a row before the stream gives up
    stt_close_wait_s: float = Field(default=15.0, ge=0)  # at stream end, wait this long for a reconnect in progress
    # STT_BACKEND=local: partial transcripts of an open speech region every this many seconds (0: finals only)
    local_partial_interval_s: float = Field(default=1.0, ge=0)
    local_partial_decoders: int = Field(default=4, ge=0)  # per process, decoders lent to open regions for partials
    # STT_BACKEND=openai: an OpenAI-compatible /v1/audio/transcriptions server, one request per speech region
    openai_stt_url: str | None = None  # base URL with /v1, e.g. http://localhost:8000/v1, https://api.openai.com/v1
    openai_stt_api_key: SecretStr | None = None  # sent as a Bearer token; never logged
    openai_stt_model: str = "whisper-1"
    openai_stt_prompt: str | None = None  # optional vocabulary/style hint sent with every region
    openai_stt_timeout_s: float = Field(default=60.0, gt=0)  # one request (a retried try starts a new one)
    openai_stt_max_concurrent: int = Field(default=16, ge=1)  # requests in flight for the whole process
    # STT_BACKEND=whisper: faster-whisper (CTranslate2) in process, regions of all streams batched on one model
    whisper_model: str = "Systran/faster-whisper-small"  # Hugging Face id (CTranslate2 conversion) or local directory
    whisper_compute_type: str = "auto"  # CTranslate2 compute type; auto: int8 on CPU, float16 on CUDA
    whisper_beam_size: int = Field(default=5, ge=1)
    whisper_batch_size: int = Field(default=8, ge=1)  # regions (30 s windows) in one model call
    whisper_max_wait_ms: float = Field(default=20.0, ge=0)  # after a first region, wait this long for batch mates
    whisper_cpu_threads: int = Field(default=0, ge=0)  # CTranslate2 threads on CPU; 0: one per core

    # --- connections and uploads ---
    max_upload_mb: float = 100.0
    max_upload_seconds: float = 4 * 3600.0
    max_json_body_kb: float = Field(default=1024.0, gt=0)  # a non-upload (JSON) request body; 413 above
    # Batch requests (/v1/vad, /v1/speaker-identification) running at once; as many more may wait up to
    # BATCH_ADMISSION_WAIT_S for a slot (Omi's backend does not retry), beyond: 429 with Retry-After
    batch_max_concurrent: int = Field(default=2, ge=1)
    batch_admission_wait_s: float = Field(default=10.0, ge=0)
    # One /v1/speaker-identification request, checked before its audio is decoded (422 beyond). Omi sends the
    # segments of one conversation, which tile its audio (at most MAX_UPLOAD_SECONDS, 4 h): 20000 is a segment
    # every 0.7 s for 4 h, and 8 h of segment time (overlaps count fully) leaves a 4 h conversation twice its length.
    batch_max_segments: int = Field(default=20000, ge=1)
    batch_max_segment_seconds: float = Field(default=8 * 3600.0, gt=0)
    idle_timeout_s: float = 90.0  # no message at all (audio, keepalive, text) for this long closes 1001 (Omi: 90)
    min_conversation_timeout_s: int = 120  # Omi's minimum for the conversation_timeout parameter
    heartbeat_s: float = 10.0
    max_frame_bytes: int = 64 * 1024
    max_streams: int = 200
    max_streams_per_user: int = Field(default=0, ge=0)  # 0: no limit (as Omi); else the newest replaces the oldest
    # How often an open stream checks storage for what other replicas did: its conversation closed there (the client
    # gets memory_processing_started / memory_created), its place taken by a newer stream (MAX_STREAMS_PER_USER).
    stream_sync_s: float = Field(default=5.0, gt=0)
    ws_send_queue_max: int = Field(default=256, gt=0)  # messages queued for a client that is not reading them
    ws_slow_client_timeout_s: float = Field(default=30.0, gt=0)  # a send stuck this long closes the client
    shutdown_grace_s: float = Field(default=20.0, ge=0)  # SIGTERM: streams get this long to finish and close

    # --- storage outages ---
    storage_pending_max_segments: int = Field(default=5000, gt=0)  # unstored segments kept per stream, newest
    storage_retry_on_close_s: float = Field(default=30.0, ge=0)  # a stream's end waits this long for storage
    storage_write_timeout_s: float = Field(default=10.0, gt=0)  # a segment write slower than this counts as failed

    # --- conversation summaries (an OpenAI-compatible chat API; empty LLM_BASE_URL: the offline plain summary) ---
    llm_base_url: str | None = None  # e.g. http://127.0.0.1:11434/v1 (Ollama), https://api.openai.com/v1
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_transcript_chars: int = Field(default=48000, gt=0)  # longer transcripts are cut (middle elided)

    # --- misc from the seed ---
    http_get_timeout: float = 30.0
    http_put_timeout: float = 300.0  # outgoing uploads (webhooks with audio); Omi's HTTP_PUT_TIMEOUT
    log_level: str = "INFO"

    # --- developer webhooks (Omi's pusher, folded in: webhooks/) ---
    webhook_allow_private: bool = False  # let users point webhooks at private, loopback and link-local addresses
    webhook_max_concurrent: int = Field(default=64, ge=1)  # requests in their first WEBHOOK_SLOW_AFTER_S, together
    # a request unanswered after WEBHOOK_SLOW_AFTER_S leaves that limit for the slow lane (at most WEBHOOK_MAX_SLOW
    # at once; a request that turns slow while it is full is cut off as a failed try), so slow and hanging receivers
    # never hold the slots the others' deliveries need
    webhook_slow_after_s: float = Field(default=2.0, gt=0)
    webhook_max_slow: int = Field(default=256, ge=0)
    webhook_queue_max: int = Field(default=32, ge=1)  # deliveries waiting per user and webhook type; beyond: dropped
    webhook_queue_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)  # bytes waiting per user and type
    webhook_max_attempts: int = Field(default=3, ge=1)  # tries of one delivery (network errors, 5xx, 429)
    webhook_backoff_s: float = Field(default=0.5, gt=0)  # first retry waits about this long (doubling, jittered)
    webhook_backoff_max_s: float = Field(default=10.0, gt=0)
    webhook_breaker_failures: int = Field(default=5, ge=1)  # failed deliveries in a row that open a URL's breaker
    webhook_breaker_open_s: float = Field(default=30.0, gt=0)  # an open breaker drops deliveries this long
    webhook_realtime_interval_s: float = Field(default=1.0, ge=0)  # at most one transcript request per user per this
    webhook_audio_default_s: int = Field(default=5, ge=1)  # audio_bytes interval when the URL has none (Omi: 5)
    webhook_audio_max_s: int = Field(default=60, ge=1)  # the longest audio_bytes interval a user may set
    webhook_settings_cache_s: float = Field(default=5.0, ge=0)  # a user's webhook settings are re-read this often

    # --- scheduled jobs ---
    jobs_enabled: bool = True  # run the scheduler in this process (leases in storage keep each run once per tick)
    job_lease_s: float = Field(default=300.0, gt=0)  # a run unfinished this long may be taken over (crashed replica)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    notify_check_interval_s: float = Field(default=60.0, gt=0)
    notify_morning_at: dt.time = dt.time(8, 0)  # user's local time of the morning reminder
    notify_evening_at: dt.time = dt.time(22, 0)  # user's local time of the daily summary
    retention_days: float = Field(default=0.0, ge=0)  # delete conversations older than this, daily; 0 = keep all
    # job runs older than this are deleted daily (each job's latest finished run stays); notifications need 2 days
    job_runs_keep_days: float = Field(default=7.0, ge=2)
    # a conversation's close (its summary included) unfinished this long is taken again by the sweep (a crashed or
    # failed close); keep it above LLM_TIMEOUT_S, or a slow summary is made twice
    conversation_close_lease_s: float = Field(default=300.0, gt=0)

    # --- voice profiles (enforced by storage: see storage.base.merge_profile_embeddings) ---
    profile_max_embeddings: int = Field(default=64, ge=1)  # rows one profile keeps; beyond, the oldest go
    profile_dedup_cosine: float = Field(default=0.98, gt=0, le=1)  # a new row this close to a kept one is not added
    person_sample_max_s: float = Field(default=120.0, gt=0)  # speech of one POST /v1/people/{id}/samples (422 above)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if self.sqlite_path is None:
            self.sqlite_path = self.data_dir / "omi.sqlite3"
        if self.stt_backend is None:
            self.stt_backend = "deepgram" if self.deepgram_api_key else "local"
        if self.stt_backend == "openai" and not self.openai_stt_url:
            raise ValueError("STT_BACKEND=openai needs OPENAI_STT_URL (e.g. http://localhost:8000/v1)")
        if self.vad_offset > self.vad_onset:
            raise ValueError("VAD_OFFSET must not exceed VAD_ONSET (hysteresis)")
        if self.vad_batch_offset > self.vad_batch_onset:
            raise ValueError("VAD_BATCH_OFFSET must not exceed VAD_BATCH_ONSET (hysteresis)")
        if self.vad_batch_smooth_frames % 2 == 0:
            raise ValueError("VAD_BATCH_SMOOTH_FRAMES must be odd (a centred median filter)")
        self.internal_network_list()  # a malformed INTERNAL_NETWORKS fails at start, not on the first call
        key = self.admin_key.get_secret_value() if self.admin_key is not None else ""
        if key and len(key) < ADMIN_KEY_MIN_CHARS:  # empty: not set (auth.py); the message never holds the key
            raise ValueError(f"ADMIN_KEY must be at least {ADMIN_KEY_MIN_CHARS} characters (it is a prefix of every "
                             f"admin credential); set a longer random key, e.g. `openssl rand -hex 32`")
        return self

    @property
    def deepgram_ws_url(self) -> str:
        """The live WebSocket base derived from DEEPGRAM_URL: http→ws, https→wss."""
        url = self.deepgram_url.rstrip("/")
        if url.startswith("https://"):
            return "wss://" + url[len("https://"):]
        if url.startswith("http://"):
            return "ws://" + url[len("http://"):]
        return url

    @property
    def firebase_enabled(self) -> bool:
        return (self.firebase_credentials is not None or self.service_account_json is not None
                or self.firebase_project_id is not None)

    def firebase_certificate(self) -> dict | str | None:
        """What `firebase_admin.credentials.Certificate` takes: SERVICE_ACCOUNT_JSON's parsed JSON (or its path),
        else FIREBASE_CREDENTIALS' path; None: application default credentials."""
        if self.service_account_json is not None:
            raw = self.service_account_json.get_secret_value().strip()
            if raw.startswith("{"):
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ValueError("SERVICE_ACCOUNT_JSON is not valid JSON") from None
            return raw
        return str(self.firebase_credentials) if self.firebase_credentials is not None else None

    def internal_network_list(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n.strip(), strict=False) for n in self.internal_networks.split(",") if n.strip()]

    def resolved_device(self) -> str:
        if self.model_device != "auto":
            return self.model_device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

