// Streams a 16 kHz mono WAV to a Deepgram-compatible /v1/listen with the unchanged @deepgram/sdk (pinned in
// package.json) and prints what the SDK received as one JSON object on stdout, for tests/test_deepgram_compat.py.
//
//   node deepgram_live.mjs <http base, e.g. http://127.0.0.1:8080> <credential> <file.wav>
//
// The audio goes as linear16 in 100 ms messages at about 5x real time, then Finalize and CloseStream; the script
// exits when the server closes the socket (or after 120 s).
import { readFileSync } from "node:fs";
import { DeepgramClient } from "@deepgram/sdk";

const [base, credential, wavPath] = process.argv.slice(2);
const ws = base.replace(/^http/, "ws");
const client = new DeepgramClient({
  apiKey: credential,
  environment: { base, production: ws, agent: ws, agentRest: base },
});

const wav = readFileSync(wavPath);
const dataAt = wav.indexOf("data") + 8; // a canonical WAV: the samples follow the "data" chunk header
const pcm = wav.subarray(dataAt);
const received = [];
const out = { messages: received, closeCode: null, error: null };

const connection = await client.listen.v1.connect({
  model: "nova-3",
  encoding: "linear16",
  sample_rate: 16000,
  channels: 1,
  punctuate: "true",
  diarize: "true",
  vad_events: "true",
  reconnectAttempts: 0,
});
const closed = new Promise((resolve) => {
  connection.on("close", (event) => {
    out.closeCode = event?.code ?? null;
    resolve();
  });
});
connection.on("message", (message) => received.push(message));
connection.on("error", (error) => {
  out.error = String(error?.message ?? error);
});
connection.connect();
await connection.waitForOpen();

const step = 3200; // 100 ms of 16 kHz pcm16
for (let i = 0; i < pcm.length; i += step) {
  connection.sendMedia(pcm.subarray(i, i + step));
  await new Promise((r) => setTimeout(r, 20));
}
connection.sendFinalize({ type: "Finalize" });
connection.sendCloseStream({ type: "CloseStream" });
await Promise.race([closed, new Promise((r) => setTimeout(r, 120_000))]);
process.stdout.write(JSON.stringify(out));
process.exit(0);
