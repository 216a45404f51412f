/**
 * A small seeded PRNG so fixtures are reproducible: xoshiro128** (32-bit state words, so
 * no BigInt on the hot path) seeded through splitmix32. Decisions (sizes, names, which file
 * to touch) come from `u32()`; bulk bytes come from an AES-128-CTR keystream whose key is
 * drawn from the generator, which is deterministic and runs at several GB/s, where a
 * JavaScript loop filling bytes would manage a few hundred MB/s.
 */
import { createCipheriv, type Cipher } from 'node:crypto';

const ZEROS = Buffer.alloc(1024 * 1024);

function splitmix32(state: number): [next: number, out: number] {
  const next = (state + 0x9e3779b9) >>> 0;
  let z = next;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return [next, (z ^ (z >>> 16)) >>> 0];
}

export class Prng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** Any integer seed up to 2^53 (both halves are mixed in); equal seeds give equal streams. */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new RangeError(`seed must be a safe integer, got ${seed}`);
    const lo = Math.abs(seed) % 2 ** 32;
    const hi = Math.floor(Math.abs(seed) / 2 ** 32) + (seed < 0 ? 0x80000000 : 0);
    let st = (lo ^ Math.imul(hi, 0x27d4eb2f)) >>> 0;
    const words: number[] = [];
    for (let i = 0; i < 4; i++) {
      const [n, out] = splitmix32(st);
      st = n;
      words.push(out);
    }
    [this.s0, this.s1, this.s2, this.s3] = words as [number, number, number, number];
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1; // the all-zero state is a fixed point
  }

  /** A uniformly distributed 32-bit unsigned integer. */
  u32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (this.s1 << 9) >>> 0;
    this.s2 = (this.s2 ^ this.s0) >>> 0;
    this.s3 = (this.s3 ^ this.s1) >>> 0;
    this.s1 = (this.s1 ^ this.s2) >>> 0;
    this.s0 = (this.s0 ^ this.s3) >>> 0;
    this.s2 = (this.s2 ^ t) >>> 0;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** A float in [0, 1) with 53 random bits. */
  float(): number {
    return ((this.u32() >>> 5) * 67108864 + (this.u32() >>> 6)) / 9007199254740992;
  }

  /** An integer in [min, max) ; `max - min` may exceed 2^32. */
  int(min: number, max: number): number {
    if (!(max > min)) throw new RangeError(`empty range [${min}, ${max})`);
    return min + Math.floor(this.float() * (max - min));
  }

  /** An integer in [min, max] spread evenly over orders of magnitude (min >= 1). */
  logInt(min: number, max: number): number {
    const lo = Math.log(Math.max(1, min));
    const hi = Math.log(Math.max(min, max) + 1);
    return Math.min(max, Math.max(min, Math.floor(Math.exp(lo + this.float() * (hi - lo)))));
  }

  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick from an empty list');
    return items[this.int(0, items.length)] as T;
  }

  /** An independent generator seeded from this one: consumers cannot disturb each other's streams. */
  fork(): Prng {
    return new Prng(this.u32() * 2 ** 21 + (this.u32() >>> 11));
  }

  /** A keystream of random bytes (AES-128-CTR over zeros) keyed from this generator. */
  stream(): ByteStream {
    const key = Buffer.alloc(16);
    for (let i = 0; i < 16; i += 4) key.writeUInt32LE(this.u32(), i);
    return new ByteStream(createCipheriv('aes-128-ctr', key, Buffer.alloc(16)));
  }

  /** `length` random bytes. */
  bytes(length: number): Buffer {
    return this.stream().next(length);
  }

  /** A lowercase hex tag, for unique-ish names. */
  hex(digits: number): string {
    let s = '';
    while (s.length < digits) s += this.u32().toString(16).padStart(8, '0');
    return s.slice(0, digits);
  }
}

export class ByteStream {
  constructor(private readonly cipher: Cipher) {}

  next(length: number): Buffer {
    const parts: Buffer[] = [];
    for (let done = 0; done < length; ) {
      const n = Math.min(ZEROS.length, length - done);
      parts.push(this.cipher.update(ZEROS.subarray(0, n)));
      done += n;
    }
    return parts.length === 1 ? (parts[0] as Buffer) : Buffer.concat(parts, length);
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
