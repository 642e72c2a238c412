// The page's behaviour: the microphone streamed to /v4/listen, the live transcript and timeline, enrolling the
// user's voice, naming a speaker, and the speech regions of a dropped file (/v1/vad). No build step, no libraries.

const TARGET_RATE = 16000; // what audio-worklet.js sends: pcm16 at 16 kHz
const LISTEN_PATH = "/v4/listen?codec=pcm16&sample_rate=16000&language=en&source=web";
const LISTEN_SUBPROTOCOL = "omi.listen"; // browser_credentials.py: the stream is accepted with this one
const CREDENTIAL_PREFIX = "omi.authorization."; // + base64url("Bearer <token>"): a browser cannot set the header
const USER_COLOUR = "#1b7f3b";
const SPEAKER_COLOURS = ["#1f5fbf", "#c2410c", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d", "#4d7c0f"];
const TIMELINE_WINDOW_S = 60; // the timeline shows the last minute

const $ = (id) => document.getElementById(id);

// --- credentials and REST ------------------------------------------------------------------------------------------

function authorization() {
  const token = $("token").value.trim();
  if (!token) throw new Error("Enter a token first (in the loopback-only mode, any name: it is your uid).");
  return `Bearer ${token}`;
}

function base64url(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// fetch with the Authorization header (when a token is given, or `required`); a non-2xx answer throws its detail.
async function api(path, { method = "GET", body, json, required = true } = {}) {
  const headers = {};
  if (required || $("token").value.trim()) headers.Authorization = authorization();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body });
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = answer && answer.detail;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail ?? response.statusText)}`);
  }
  return answer;
}

// --- the microphone: 16 kHz pcm16 frames from audio-worklet.js -------------------------------------------------------

class Microphone {
  constructor() {
    this.listeners = new Set(); // each gets {pcm: ArrayBuffer, level}
    this.context = null;
  }

  get running() {
    return this.context !== null;
  }

  async start() {
    if (this.running) return;
    // Raw audio: the server's VAD and speaker embeddings expect speech as it was, not a call's processed voice.
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule("/web/audio-worklet.js");
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "pcm16-resampler");
    this.node.port.onmessage = (event) => this.listeners.forEach((listener) => listener(event.data));
    this.source.connect(this.node);
    this.node.connect(this.context.destination); // pulls the node; it writes no output, so nothing is heard
    await this.context.resume();
  }

  async stop() {
    if (!this.running) return;
    this.node.port.postMessage("flush");
    await new Promise((resolve) => setTimeout(resolve, 50)); // the last partial frame arrives before the close
    this.source.disconnect();
    this.node.disconnect();
    this.stream.getTracks().forEach((track) => track.stop());
    await this.context.close();
    this.context = null;
  }
}

const microphone = new Microphone();

// --- the live stream -----------------------------------------------------------------------------------------------

const state = {
  socket: null,
  segments: new Map(), // id -> the latest segment (upserted by id, as the protocol says)
  people: new Map(), // person id -> name, for labels
  levels: [], // [seconds, RMS level] of each frame sent
  sentSeconds: 0, // audio sent so far: the timeline's clock, as the segments' start/end count it
  pings: 0,
  enrolling: false, // the microphone stays on for an enrolment when the stream ends
};

function setStatus(text) {
  $("status").textContent = text;
}

function speakerColour(segment) {
  if (segment.is_user) return USER_COLOUR;
  const n = Number.isInteger(segment.speaker_id) ? segment.speaker_id : 0;
  return SPEAKER_COLOURS[n % SPEAKER_COLOURS.length];
}

function speakerLabel(segment) {
  if (segment.is_user) return "you";
  if (segment.person_id && state.people.has(segment.person_id)) return state.people.get(segment.person_id);
  return `Speaker ${segment.speaker_id ?? "?"}`;
}

function onAudioFrame({ pcm, level }) {
  const socket = state.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(pcm);
  state.levels.push([state.sentSeconds, level]);
  state.sentSeconds += pcm.byteLength / 2 / TARGET_RATE;
}

async function startListening() {
  let credential;
  try {
    credential = base64url(authorization());
  } catch (error) {
    setStatus(error.message);
    return;
  }
  $("start").disabled = true;
  state.segments.clear();
  state.levels = [];
  state.sentSeconds = 0;
  renderTranscript();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}${LISTEN_PATH}`, [LISTEN_SUBPROTOCOL, CREDENTIAL_PREFIX + credential]);
  socket.binaryType = "arraybuffer";
  state.socket = socket;
  setStatus("Connecting...");
  socket.onopen = async () => {
    try {
      await microphone.start();
      microphone.listeners.add(onAudioFrame);
      $("stop").disabled = false;
      if (!$("status").textContent.startsWith("Listening")) setStatus("Listening: connected"); // keep the server's
    } catch (error) {
      setStatus(`No microphone: ${error.message}`);
      socket.close(1000);
    }
  };
  socket.onmessage = (event) => onServerMessage(event.data);
  socket.onclose = (event) => {
    microphone.listeners.delete(onAudioFrame);
    if (!state.enrolling) microphone.stop();
    state.socket = null;
    $("start").disabled = false;
    $("stop").disabled = true;
    // A refused upgrade (a wrong token) closes with 1006 before any message: the browser hides the HTTP status.
    const why = event.code === 1006 ? "refused or unreachable (check the token)" : `${event.code} ${event.reason}`;
    setStatus(`Not listening (closed: ${why}).`);
  };
}

function onServerMessage(data) {
  if (data === "ping") {
    state.pings += 1; // the server's heartbeat (every HEARTBEAT_S); nothing to answer
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return;
  }
  if (Array.isArray(message)) {
    for (const segment of message) state.segments.set(segment.id, segment);
    renderTranscript();
    renderSpeakerChoices();
  } else if (message.type === "service_status") {
    setStatus(`Listening: ${message.status}`);
  } else if (message.type === "error") {
    setStatus(`Server error ${message.code}: ${message.message}`);
  }
}

function stopListening() {
  $("stop").disabled = true;
  microphone.listeners.delete(onAudioFrame);
  if (state.socket) state.socket.close(1000);
}

// --- rendering -------------------------------------------------------------------------------------------------------

function orderedSegments() {
  return [...state.segments.values()].sort((a, b) => a.start - b.start);
}

function renderTranscript() {
  const box = $("transcript");
  box.replaceChildren(
    ...orderedSegments().map((segment) => {
      const row = document.createElement("p");
      row.className = "segment";
      row.dataset.id = segment.id;
      row.dataset.speakerId = String(segment.speaker_id);
      row.dataset.isUser = String(Boolean(segment.is_user));
      row.style.borderColor = speakerColour(segment);
      const who = document.createElement("span");
      who.className = "speaker";
      who.style.color = speakerColour(segment);
      who.textContent = speakerLabel(segment);
      const when = document.createElement("span");
      when.className = "time";
      when.textContent = `${segment.start.toFixed(1)}-${segment.end.toFixed(1)} s`;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = segment.text; // textContent: a transcript or a name is never read as HTML
      row.append(who, when, text);
      return row;
    }),
  );
}

function drawTimeline() {
  const canvas = $("timeline");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  const end = Math.max(state.sentSeconds, TIMELINE_WINDOW_S / 2);
  const start = Math.max(0, end - TIMELINE_WINDOW_S);
  const x = (t) => ((t - start) / (end - start)) * width;
  g.clearRect(0, 0, width, height);
  g.fillStyle = "#f4f4f5";
  g.fillRect(0, 0, width, height);
  // Segments: the speakers' spans in the top half.
  for (const segment of state.segments.values()) {
    if (segment.end < start) continue;
    g.fillStyle = speakerColour(segment);
    g.fillRect(x(segment.start), 4, Math.max(2, x(segment.end) - x(segment.start)), height / 2 - 8);
  }
  // The mic level under them: speech stands out of the silence.
  g.fillStyle = "#71717a";
  const barWidth = Math.max(1, Math.round(width / (TIMELINE_WINDOW_S * 25)));
  for (const [t, level] of state.levels) {
    if (t < start) continue;
    const h = Math.round(Math.min(1, Math.sqrt(level) * 2) * (height / 2 - 4)); // sqrt: quiet speech still shows
    g.fillRect(Math.round(x(t)), height - h, barWidth, h); // whole pixels: crisp bars, not blurred 1 px slivers
  }
  g.fillStyle = "#3f3f46";
  g.font = "10px sans-serif";
  for (let t = Math.ceil(start / 5) * 5; t <= end; t += 5) g.fillText(`${t}s`, x(t) + 2, height / 2 + 4);
  requestAnimationFrame(drawTimeline);
}

// --- speakers: enrol the user's voice, name a speaker ---------------------------------------------------------------

function wav16k(chunks) {
  const samples = chunks.reduce((n, chunk) => n + chunk.byteLength / 2, 0);
  const buffer = new ArrayBuffer(44 + samples * 2);
  const view = new DataView(buffer);
  const ascii = (offset, text) => [...text].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  view.setUint32(4, 36 + samples * 2, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, TARGET_RATE, true);
  view.setUint32(28, TARGET_RATE * 2, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  ascii(36, "data");
  view.setUint32(40, samples * 2, true);
  let offset = 44;
  for (const chunk of chunks) {
    new Uint8Array(buffer, offset, chunk.byteLength).set(new Uint8Array(chunk));
    offset += chunk.byteLength;
  }
  return new Blob([buffer], { type: "audio/wav" });
}

async function enrolMyVoice() {
  const say = (text) => ($("speaker-status").textContent = text);
  const seconds = Number($("enrol-seconds").value) || 10;
  try {
    authorization();
  } catch (error) {
    say(error.message);
    return;
  }
  $("enrol").disabled = true;
  state.enrolling = true;
  const chunks = [];
  let collected = 0; // samples
  let enough;
  const recorded = new Promise((resolve) => (enough = resolve));
  // Counted in samples, not wall-clock time: the server wants at least 5 s of audio, and a busy machine's audio
  // thread may deliver late. A copy of each frame: the live stream sends the same buffer.
  const collect = ({ pcm }) => {
    chunks.push(pcm.slice(0));
    collected += pcm.byteLength / 2;
    const left = Math.ceil(seconds - collected / TARGET_RATE);
    say(`Recording your voice: speak for ${left} s more...`);
    if (collected >= seconds * TARGET_RATE) enough();
  };
  const wasRunning = microphone.running;
  try {
    await microphone.start();
    microphone.listeners.add(collect);
    say(`Recording your voice: speak for ${seconds} s...`);
    await recorded;
    microphone.listeners.delete(collect);
    if (!wasRunning && !state.socket) await microphone.stop();
    say("Uploading...");
    const form = new FormData();
    form.append("file", wav16k(chunks), "my-voice.wav");
    const profile = await api("/v3/upload-audio", { method: "POST", body: form });
    say(`Enrolled: ${profile.speech_seconds?.toFixed?.(1) ?? "?"} s of your speech. New streams label you "you".`);
  } catch (error) {
    say(`Enrolment failed: ${error.message}`);
  } finally {
    microphone.listeners.delete(collect);
    state.enrolling = false;
    $("enrol").disabled = false;
  }
}

function renderSpeakerChoices() {
  const select = $("speaker-select");
  const chosen = select.value;
  const ids = [...new Set(orderedSegments().filter((s) => !s.is_user).map((s) => s.speaker_id))].sort((a, b) => a - b);
  select.replaceChildren(
    ...ids.map((id) => {
      const option = document.createElement("option");
      option.value = String(id);
      option.textContent = `Speaker ${id}`;
      return option;
    }),
  );
  if (ids.map(String).includes(chosen)) select.value = chosen;
  $("name-speaker-button").disabled = ids.length === 0;
}

async function nameSpeaker(event) {
  event.preventDefault();
  const say = (text) => ($("speaker-status").textContent = text);
  const socket = state.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    say("Start listening first: a speaker is named in the live conversation.");
    return;
  }
  const speakerId = Number($("speaker-select").value);
  const name = $("speaker-name").value.trim();
  try {
    let personId = "user";
    let personName = null;
    if (name.toLowerCase() !== "me") {
      const person = await api("/v1/users/people", { method: "POST", json: { name } });
      personId = person.id;
      personName = person.name;
      state.people.set(person.id, person.name);
    }
    const segmentIds = orderedSegments().filter((s) => s.speaker_id === speakerId && !s.is_user).map((s) => s.id);
    socket.send(JSON.stringify({
      type: "speaker_assigned", speaker_id: speakerId, person_id: personId, person_name: personName, segment_ids: segmentIds,
    }));
    say(`Speaker ${speakerId} is ${personName ?? "you"}: the server relabels their segments.`);
  } catch (error) {
    say(`Naming failed: ${error.message}`);
  }
}

// --- speech regions of a file (/v1/vad) -----------------------------------------------------------------------------

async function fileSeconds(file) {
  try {
    // An OfflineAudioContext decodes without a user gesture and without touching the audio output.
    const audio = await new OfflineAudioContext(1, 1, TARGET_RATE).decodeAudioData(await file.arrayBuffer());
    return audio.duration;
  } catch {
    return null; // a format the browser cannot decode: the server may still; the regions' end bounds the drawing
  }
}

async function detectSpeech(file) {
  const say = (text) => ($("vad-status").textContent = text);
  if (!file) return;
  say(`Finding speech in ${file.name}...`);
  $("vad-regions").replaceChildren();
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    // In the loopback-only mode /v1/vad needs no token; with auth configured it does.
    const [regions, duration] = await Promise.all([
      api("/v1/vad", { method: "POST", body: form, required: false }),
      fileSeconds(file),
    ]);
    const total = Math.max(duration ?? 0, ...regions.map((r) => r.end), 1);
    const speech = regions.reduce((sum, r) => sum + r.duration, 0);
    say(`${file.name}: ${regions.length} speech regions, ${speech.toFixed(1)} s of speech in ${total.toFixed(1)} s.`);
    drawRegions(regions, total);
    $("vad-regions").replaceChildren(
      ...regions.map((r) => {
        const item = document.createElement("li");
        item.className = "region";
        item.dataset.start = String(r.start); // the server's seconds, unrounded
        item.dataset.end = String(r.end);
        item.textContent = `${r.start.toFixed(2)}-${r.end.toFixed(2)} s (${r.duration.toFixed(2)} s)`;
        return item;
      }),
    );
  } catch (error) {
    say(`No regions: ${error.message}`);
    drawRegions([], 1);
  }
}

function drawRegions(regions, total) {
  const canvas = $("vad-canvas");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  g.fillStyle = "#f4f4f5";
  g.fillRect(0, 0, width, height);
  g.fillStyle = "#16a34a";
  for (const r of regions) g.fillRect((r.start / total) * width, 6, Math.max(1, ((r.end - r.start) / total) * width), height - 20);
  g.fillStyle = "#3f3f46";
  g.font = "10px sans-serif";
  const step = total > 60 ? 10 : 5;
  for (let t = 0; t <= total; t += step) g.fillText(`${t}s`, (t / total) * width + 2, height - 3);
  canvas.dataset.regions = String(regions.length);
}

// --- wiring ----------------------------------------------------------------------------------------------------------

$("start").addEventListener("click", startListening);
$("stop").addEventListener("click", stopListening);
$("enrol").addEventListener("click", enrolMyVoice);
$("name-speaker").addEventListener("submit", nameSpeaker);
$("show-token").addEventListener("change", (e) => ($("token").type = e.target.checked ? "text" : "password"));
$("auth").addEventListener("submit", (e) => e.preventDefault());
$("vad-file").addEventListener("change", (e) => detectSpeech(e.target.files[0]));
const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (e) => {
  e.preventDefault();
  dropZone.classList.add("over");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  dropZone.classList.remove("over");
  detectSpeech(e.dataTransfer.files[0]);
});
requestAnimationFrame(drawTimeline);
