/**
 * A reproducible session of writes into a virtual disk, for grow-in-place and crash tests:
 * non-overlapping, sector-aligned ranges of seeded random bytes, some inside one 64 KiB
 * block, some across block, grain and cluster boundaries, some at the disk's very end.
 * The same (seed, size, count) always gives the same writes, so a test can recompute what
 * a killed process was writing.
 */
import { Prng } from './prng.js';

export interface PlannedWrite {
  offset: number;
  data: Buffer;
}

export function planWrites(seed: number, diskSize: number, count: number, maxLength = 256 * 1024): PlannedWrite[] {
  const rng = new Prng(seed);
  const sectors = diskSize / 512;
  const maxSectors = Math.max(1, Math.floor(maxLength / 512));
  const taken: [number, number][] = [];
  const writes: PlannedWrite[] = [];
  const overlaps = (s: number, n: number) => taken.some(([a, b]) => s < b && a < s + n);
  for (let tries = 0; writes.length < count && tries < count * 20; tries++) {
    let start: number;
    let n = rng.int(1, maxSectors + 1);
    const blocks = Math.max(1, Math.floor(sectors / 128));
    const kind = writes.length % 4;
    // anywhere; straddling a 64 KiB boundary; one whole aligned block; near the end
    if (kind === 0) start = rng.int(0, sectors);
    else if (kind === 1) start = Math.max(0, rng.int(1, blocks + 1) * 128 - Math.floor(n / 2));
    else if (kind === 2) {
      start = rng.int(0, blocks) * 128;
      n = 128;
    } else start = Math.max(0, sectors - n - rng.int(0, 4));
    start = Math.min(start, sectors - 1);
    n = Math.min(n, sectors - start);
    if (overlaps(start, n)) continue;
    taken.push([start, start + n]);
    writes.push({ offset: start * 512, data: rng.bytes(n * 512) });
  }
  return writes;
}
