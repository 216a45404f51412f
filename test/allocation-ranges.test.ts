// Proves the range arithmetic, the bitmap scanner and freeBlockMask against brute-force byte/bit oracles, including the last partial block, offsets above 2^31 and 2^32, and bad arguments.
import t, { type Test } from 'tap';
import { freeBlockMask } from '../src/formats/fs/allocation.js';
import { UsageError } from '../src/formats/errors.js';
import { clipRanges, FreeRunCollector, normalizeRanges, subtractRanges, totalLength } from '../src/formats/fs/ranges.js';
import type { ByteRange } from '../src/formats/types.js';

/** A small deterministic generator, so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

function toBytes(ranges: readonly ByteRange[], size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (const r of ranges) for (let i = r.offset; i < r.offset + r.length && i < size; i++) if (i >= 0) b[i] = 1;
  return b;
}

function randomRanges(next: () => number, size: number, n: number): ByteRange[] {
  return Array.from({ length: n }, () => {
    const offset = Math.floor(next() * size);
    return { offset, length: Math.floor(next() * (size / 4)) };
  });
}

/** Byte maps compared cheaply; tap's deep diff only when they differ. */
function sameBytes(tt: Test, got: Uint8Array, want: Uint8Array, what: string): void {
  if (Buffer.compare(Buffer.from(got), Buffer.from(want)) !== 0) tt.same(got, want, what);
}

t.test('normalize, clip and subtract agree with a byte map', async (tt) => {
  const next = rng(7);
  for (let round = 0; round < 300; round++) {
    const size = 1 + Math.floor(next() * 300);
    const a = randomRanges(next, size, Math.floor(next() * 8));
    const b = randomRanges(next, size, Math.floor(next() * 8));
    const norm = normalizeRanges(a);
    const bytesA = toBytes(a, size * 2);
    sameBytes(tt, toBytes(norm, size * 2), bytesA, 'normalize');
    for (let i = 1; i < norm.length; i++) {
      if (norm[i].offset <= norm[i - 1].offset + norm[i - 1].length) tt.fail(`not merged: ${JSON.stringify(norm)}`);
    }
    const lo = Math.floor(next() * size);
    const hi = lo + Math.floor(next() * size);
    sameBytes(tt, toBytes(clipRanges(norm, lo, hi), size * 2), bytesA.map((v, i) => (i >= lo && i < hi ? v : 0)), 'clip');
    const bytesB = toBytes(b, size * 2);
    const diff = subtractRanges(norm, b);
    sameBytes(tt, toBytes(diff, size * 2), bytesA.map((v, i) => (v && !bytesB[i] ? 1 : 0)), 'subtract');
    if (totalLength(diff) !== toBytes(diff, size * 2).reduce((s, v) => s + v, 0)) tt.fail('totalLength');
  }
  tt.pass('300 random cases of normalize, clip, subtract');
  tt.same(normalizeRanges([{ offset: 10, length: 0 }]), [], 'empty ranges dropped');
  tt.same(normalizeRanges([{ offset: 5, length: 5 }, { offset: 0, length: 5 }]), [{ offset: 0, length: 10 }], 'adjacent ranges merged');
});

t.test('FreeRunCollector equals a bit-by-bit scan, across pieces', async (tt) => {
  const next = rng(11);
  for (let round = 0; round < 200; round++) {
    const bytes = 1 + Math.floor(next() * 64);
    const bitmap = new Uint8Array(bytes);
    for (let i = 0; i < bytes; i++) {
      const kind = next();
      bitmap[i] = kind < 0.3 ? 0x00 : kind < 0.6 ? 0xff : Math.floor(next() * 256);
    }
    const count = Math.max(1, bytes * 8 - Math.floor(next() * 8));
    const base = 2 ** 33 + 512; // above 2^32: no bit tricks on offsets
    const unit = 4096;
    // The oracle: one unit at a time.
    const expected: ByteRange[] = [];
    for (let u = 0; u < count; u++) {
      if (!((bitmap[Math.floor(u / 8)] >> u % 8) & 1)) expected.push({ offset: base + u * unit, length: unit });
    }
    // Ours: the same bitmap fed in two pieces split on a byte boundary.
    const c = new FreeRunCollector(base, unit);
    const splitByte = Math.floor(next() * bytes);
    const firstCount = Math.min(count, splitByte * 8);
    if (firstCount > 0) c.addBitmap(bitmap.subarray(0, splitByte), 0, firstCount);
    if (count > firstCount) c.addBitmap(bitmap.subarray(splitByte), firstCount, count - firstCount);
    const got = c.ranges();
    tt.same(got, normalizeRanges(expected));
    tt.equal(c.freeUnits * unit, totalLength(expected));
  }
  // minUnits: complete runs shorter than it are dropped, joined runs judged whole.
  const short = new FreeRunCollector(0, 1, 5);
  short.addBitmap(Uint8Array.of(0b11100001), 0, 8); // free 1..4 (4 units): dropped
  short.addBitmap(Uint8Array.of(0b00111111), 8, 8); // free 14..15, joined with 16..18 below: 5 units, kept
  short.addBitmap(Uint8Array.of(0b11111000), 16, 8);
  tt.same(short.ranges(), [{ offset: 14, length: 5 }]);
  tt.equal(short.freeUnits, 5, 'dropped runs do not count');

  const c = new FreeRunCollector(0, 1);
  c.addBitmap(new Uint8Array([0xff]), 8, 8);
  tt.throws(() => c.addBitmap(new Uint8Array([0]), 0, 8), RangeError, 'pieces out of order refused');
  tt.throws(() => c.addBitmap(new Uint8Array(1), 16, 9), RangeError, 'count beyond the bitmap refused');
  const gap = new FreeRunCollector(0, 1);
  gap.addBitmap(new Uint8Array([0]), 0, 8);
  gap.addBitmap(new Uint8Array([0]), 16, 8);
  tt.same(gap.ranges(), [{ offset: 0, length: 8 }, { offset: 16, length: 8 }], 'a gap between pieces is not free');
});

/** Brute force: a block is free when every existing byte of it is in a free range. */
function maskOracle(free: ByteRange[], deviceSize: number, blockSize: number): Uint8Array {
  const bytes = toBytes(free, deviceSize);
  const n = Math.ceil(deviceSize / blockSize);
  const out = new Uint8Array(n);
  for (let k = 0; k < n; k++) {
    let all = 1;
    for (let i = k * blockSize; i < Math.min((k + 1) * blockSize, deviceSize); i++) if (!bytes[i]) all = 0;
    out[k] = all;
  }
  return out;
}

t.test('freeBlockMask equals the brute-force oracle', async (tt) => {
  const next = rng(3);
  for (let round = 0; round < 400; round++) {
    const deviceSize = Math.floor(next() * 400);
    const blockSize = 1 + Math.floor(next() * 70);
    const free = randomRanges(next, deviceSize + 50, Math.floor(next() * 10)); // some pass the device end
    sameBytes(tt, freeBlockMask(free, deviceSize, blockSize), maskOracle(free, deviceSize, blockSize), `size ${deviceSize} block ${blockSize}`);
  }
  tt.pass('400 random cases');
});

t.test('freeBlockMask edge matrix', async (tt) => {
  const B = 65536;
  tt.same(freeBlockMask([], 0, B), new Uint8Array(0), 'empty device');
  tt.same(freeBlockMask([{ offset: 0, length: 100 }], 100, B), Uint8Array.of(1), 'one partial block, all free');
  tt.same(freeBlockMask([{ offset: 0, length: 99 }], 100, B), Uint8Array.of(0), 'one partial block, last byte used');
  tt.same(freeBlockMask([{ offset: 0, length: B }], B, B), Uint8Array.of(1), 'exact single block');
  tt.same(freeBlockMask([{ offset: 1, length: 2 * B }], 3 * B, B), Uint8Array.of(0, 1, 0), 'range not aligned: only whole blocks');
  tt.same(
    freeBlockMask([{ offset: 0, length: B / 2 }, { offset: B / 2, length: B / 2 }], B, B),
    Uint8Array.of(1),
    'two halves make a whole block',
  );
  // Device of 3 blocks and 10 bytes: the last block is partial and free when its 10 bytes are.
  const size = 3 * B + 10;
  tt.same(freeBlockMask([{ offset: 2 * B, length: B + 10 }], size, B), Uint8Array.of(0, 0, 1, 1));
  tt.same(freeBlockMask([{ offset: 2 * B, length: B + 9 }], size, B), Uint8Array.of(0, 0, 1, 0));
  tt.same(freeBlockMask([{ offset: 3 * B, length: 1000 }], size, B), Uint8Array.of(0, 0, 0, 1), 'range past the end is clipped');

  // Offsets above 2^31 and 2^32: a 6 GiB + 1 byte device.
  const big = 6 * 2 ** 30 + 1;
  const mask = freeBlockMask(
    [
      { offset: 2 ** 31 - B, length: 2 * B }, // straddles 2^31: blocks 32767 and 32768
      { offset: 2 ** 32 + 1, length: 3 * B }, // starts one byte in: blocks 65537, 65538 only
      { offset: big - 1, length: 1 }, // the last block is that single byte
    ],
    big,
    B,
  );
  tt.equal(mask.length, 6 * 16384 + 1);
  const free = [...mask.keys()].filter((k) => mask[k] === 1);
  tt.same(free, [32767, 32768, 65537, 65538, 6 * 16384]);

  // A 1 TiB device with 64 KiB blocks: 16 Mi entries, range near the end.
  const tib = 2 ** 40;
  const m2 = freeBlockMask([{ offset: tib - 3 * B, length: 3 * B }], tib, B);
  tt.equal(m2.length, 2 ** 24);
  tt.same([...m2.subarray(2 ** 24 - 4)], [0, 1, 1, 1]);

  tt.throws(() => freeBlockMask([], 100, 0), UsageError);
  tt.throws(() => freeBlockMask([], 100, 1.5), UsageError);
  tt.throws(() => freeBlockMask([], -1, 512), UsageError);
});
