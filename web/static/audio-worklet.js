// The microphone's audio at the AudioContext's rate (`sampleRate`, often 48 kHz) -> 16 kHz 16-bit PCM frames of
// FRAME_MS, posted to the page as {pcm: ArrayBuffer (transferred), level: RMS of the frame 0..1}.
// The server's pcm16 codec at sample_rate=16000 takes them as they are.

const TARGET_RATE = 16000;
const FRAME_MS = 40; // inside the 20-100 ms a /v4/listen frame should span
const FRAME_SAMPLES = (TARGET_RATE * FRAME_MS) / 1000;
const TAPS = 63; // low-pass length: enough to keep 8-24 kHz content from folding into speech when downsampling

// Windowed-sinc low-pass at `cutoff` (a fraction of the input rate), normalised to unit gain.
function lowPass(cutoff, taps) {
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const blackman = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * blackman;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class Pcm16Resampler extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    // Below the target rate there is nothing to filter; above it, cut a little under the new Nyquist (8 kHz).
    this.filter = this.step > 1 ? lowPass((0.45 * TARGET_RATE) / sampleRate, TAPS) : null;
    this.history = new Float32Array(this.filter ? TAPS : 0); // the last TAPS input samples, a ring
    this.filtered = [0, 0]; // the filtered input at positions `base` and `base + 1`, for interpolation
    this.base = -1; // index (in input samples since the start) of filtered[0]
    this.inputCount = 0; // input samples seen
    this.nextOut = 0; // position, in input samples, of the next output sample
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.sumSquares = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.flush();
    };
  }

  filterNext(sample) {
    if (!this.filter) return sample;
    const n = this.history.length;
    this.history[this.inputCount % n] = sample;
    let acc = 0;
    for (let k = 0; k < n; k++) acc += this.filter[k] * this.history[(this.inputCount - k + n * 2) % n];
    return acc;
  }

  push(sample) {
    const value = Math.max(-1, Math.min(1, sample));
    this.frame[this.filled++] = value < 0 ? value * 32768 : value * 32767;
    this.sumSquares += value * value;
    if (this.filled === FRAME_SAMPLES) this.flush();
  }

  flush() {
    if (this.filled === 0) return;
    const pcm = this.frame.slice(0, this.filled).buffer;
    const level = Math.sqrt(this.sumSquares / this.filled);
    this.port.postMessage({ pcm, level }, [pcm]);
    this.filled = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const input = channels[0]; // mono: the first channel (a stereo mic repeats itself)
    for (let i = 0; i < input.length; i++) {
      const y = this.filterNext(input[i]);
      this.filtered[0] = this.filtered[1];
      this.filtered[1] = y;
      this.base = this.inputCount - 1;
      this.inputCount++;
      // Emit every output sample that lies between the last two filtered inputs (linear interpolation).
      while (this.nextOut <= this.base + 1) {
        if (this.nextOut >= this.base) {
          const frac = this.nextOut - this.base;
          this.push(this.filtered[0] + (this.filtered[1] - this.filtered[0]) * frac);
        }
        this.nextOut += this.step;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-resampler", Pcm16Resampler);
