/**
 * Synthetic disk content for the benchmarks.
 */
import type { Rng } from './common.js';

/**
 * Text-like bytes: phrases of a random vocabulary (words and phrases both drawn with a
 * Zipf 1/rank law), with capitals, punctuation, numbers and line breaks. Phrases repeat
 * within zstd's window the way prose, logs and source code repeat, so zstd -1 shrinks it
 * about 3x at a speed like real text (checked against node_modules' .js/.ts: 4.8x).
 */
export class TextGen {
  private readonly pool: Uint8Array;
  private readonly starts: Uint32Array;
  private readonly lens: Uint16Array;
  private readonly logPhrases: number;

  constructor(private readonly rng: Rng, words = 8192, private readonly phrases = 32768) {
    const letters = Buffer.from('etaoinshrdlcumwfgypbvkjxqz');
    const vocab: number[][] = [];
    for (let w = 0; w < words; w++) {
      // frequent words are short, as in natural language
      const len = Math.max(1, Math.min(14, Math.round(2 + Math.log2(w + 1) * 0.5 + rng.int(5) - 2)));
      const word: number[] = [];
      for (let i = 0; i < len; i++) {
        const r = rng.float();
        word.push(letters[Math.floor(r * r * letters.length)]!);
      }
      vocab.push(word);
    }
    const logWords = Math.log(words);
    const bytes: number[] = [];
    this.starts = new Uint32Array(phrases);
    this.lens = new Uint16Array(phrases);
    for (let ph = 0; ph < phrases; ph++) {
      this.starts[ph] = bytes.length;
      const count = 1 + rng.int(6);
      for (let k = 0; k < count; k++) {
        const word = vocab[Math.floor(Math.exp(rng.float() * logWords)) - 1]!;
        for (const c of word) bytes.push(c);
        bytes.push(32);
      }
      this.lens[ph] = bytes.length - this.starts[ph]!;
    }
    this.pool = Uint8Array.from(bytes);
    this.logPhrases = Math.log(phrases);
  }

  fill(buf: Uint8Array): void {
    const rng = this.rng;
    const pool = this.pool;
    const starts = this.starts;
    const lens = this.lens;
    const logPhrases = this.logPhrases;
    const n = buf.length;
    let p = 0;
    let col = 0;
    let capital = true;
    while (p < n) {
      const r = rng.u32();
      if ((r & 31) === 0) {
        // a number: 1-8 random digits
        const digits = 1 + ((r >>> 5) & 7);
        for (let i = 0; i < digits && p < n; i++) buf[p++] = 48 + (rng.u32() % 10);
        if (p < n) buf[p++] = 32;
        col += digits + 1;
      } else {
        const ph = Math.floor(Math.exp(rng.float() * logPhrases)) - 1; // P(ph) ~ 1/(ph+1)
        const s = starts[ph]!;
        const len = Math.min(lens[ph]!, n - p);
        for (let i = 0; i < len; i++) buf[p + i] = pool[s + i]!;
        if (capital) buf[p] = buf[p]! - 32;
        p += len;
        col += len;
      }
      capital = false;
      if (p >= n) break;
      const sep = (r >>> 8) & 15;
      if (sep === 0) {
        buf[p - 1] = 46; // "." replaces the trailing space
        capital = true;
      } else if (sep === 1) buf[p - 1] = 44; // ","
      if (col > 64 + ((r >>> 12) & 15)) {
        buf[p - 1] = 10;
        col = 0;
      }
    }
  }
}

/** Marks the blocks of the open benchmark: "BENK". */
const PATTERN_MAGIC = 0x4b4e4542;

/**
 * Fills `into` with a repeating 16-byte unit that names who wrote it: image number, block
 * number, a mix of both, magic. Unique per (image, block), and zstd stores 64 KiB of it
 * in a few dozen bytes.
 */
export function patternBlock(image: number, block: number, into: Buffer): Buffer {
  const unit = Buffer.alloc(16);
  unit.writeUInt32LE(image >>> 0, 0);
  unit.writeUInt32LE(block >>> 0, 4);
  unit.writeUInt32LE((Math.imul(image + 1, 0x9e3779b1) ^ Math.floor(block / 4294967296) ^ block) >>> 0, 8);
  unit.writeUInt32LE(PATTERN_MAGIC, 12);
  return into.fill(unit);
}
