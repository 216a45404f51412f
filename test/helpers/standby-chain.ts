// A chain for standby-disk tests: a small sparse raw disk changed by random block writes
// (and some blocks zeroed), backed up after each change with the library. The test keeps
// what it needs as independent truth: a sparse copy of the raw disk at chosen points, and
// the chain blocks each point's writes touched.
import { open, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../../src/chain/backup.js';
import { copySparse } from './alloc-tools.js';
import { prng } from './cli.js';

export const CHAIN_BLOCK = 64 * 1024;

export interface ChainHistory {
  raw: string;
  folder: string;
  size: number;
  /** Per point: the chain blocks its writes touched (point 0: every block written). */
  touched: Set<number>[];
  /** Sparse copies of the raw disk, by point number. */
  copies: Map<number, string>;
  /** Capture time of each point, ms. */
  times: number[];
}

export interface ChainOptions {
  dir: string;
  size: number;
  /** Blocks of data written before the base. */
  initialBlocks: number;
  /** Blocks changed before each incremental. */
  blocksPerPoint: number;
  seed: number;
  /** First capture time; points are an hour apart. */
  start?: number;
  /** Write these bytes at offset 0 first (a boot sector). */
  bootSector?: Buffer;
}

export async function startChain(o: ChainOptions): Promise<ChainHistory> {
  const raw = join(o.dir, 'disk.raw');
  const folder = join(o.dir, 'backups');
  await open(raw, 'w').then((h) => h.close());
  await truncate(raw, o.size);
  const h: ChainHistory = { raw, folder, size: o.size, touched: [], copies: new Map(), times: [] };
  const random = prng(o.seed);
  const blocks = Math.floor(o.size / CHAIN_BLOCK); // whole blocks only
  const chosen = new Set<number>();
  const fh = await open(raw, 'r+');
  try {
    if (o.bootSector) {
      await fh.write(o.bootSector, 0, o.bootSector.length, 0);
      chosen.add(0);
    }
    for (let i = 0; i < o.initialBlocks; i++) {
      const b = 1 + (random(4).readUInt32LE(0) % (blocks - 1));
      chosen.add(b);
      await fh.write(random(CHAIN_BLOCK), 0, CHAIN_BLOCK, b * CHAIN_BLOCK);
    }
  } finally {
    await fh.close();
  }
  h.touched.push(chosen);
  rngs.set(h, { random, blocksPerPoint: o.blocksPerPoint, time: o.start ?? Date.UTC(2026, 10, 2, 8, 0, 0), nonZero: new Set(chosen) });
  await takeBackup(h, true);
  return h;
}

// Per history: its generator, and which blocks hold data (zeroing a zero block changes nothing).
const rngs = new WeakMap<ChainHistory, { random: (n: number) => Buffer; blocksPerPoint: number; time: number; nonZero: Set<number> }>();

async function takeBackup(h: ChainHistory, full: boolean): Promise<void> {
  const r = rngs.get(h)!;
  const at = r.time + h.times.length * 3600_000;
  await backup(h.raw, h.folder, { at, forensic: true, full, workers: 0, volume: 'SYS' });
  h.times.push(at);
}

/** Changes random blocks (a few become zeros) and takes an incremental. */
export async function nextPoint(h: ChainHistory, opts: { full?: boolean } = {}): Promise<void> {
  const r = rngs.get(h)!;
  const blocks = Math.floor(h.size / CHAIN_BLOCK);
  const touched = new Set<number>();
  const fh = await open(h.raw, 'r+');
  try {
    for (let i = 0; i < r.blocksPerPoint; i++) {
      // Block 0 keeps its boot sector.
      const b = 1 + (r.random(4).readUInt32LE(0) % (blocks - 1));
      const zero = i % 7 === 6;
      // One change per block and point, and zeroing a zero block changes nothing.
      if (touched.has(b) || (zero && !r.nonZero.has(b))) continue;
      touched.add(b);
      if (zero) r.nonZero.delete(b);
      else r.nonZero.add(b);
      await fh.write(zero ? Buffer.alloc(CHAIN_BLOCK) : r.random(CHAIN_BLOCK), 0, CHAIN_BLOCK, b * CHAIN_BLOCK);
    }
  } finally {
    await fh.close();
  }
  h.touched.push(touched);
  await takeBackup(h, !!opts.full);
}

/** Keeps a sparse copy of the raw disk as it is now, as point `point`. */
export async function keepCopy(h: ChainHistory, point: number): Promise<string> {
  const to = join(h.folder, '..', `at-${point}.raw`);
  await copySparse(h.raw, to);
  h.copies.set(point, to);
  return to;
}

/** The union of the blocks touched by points from..to (inclusive). */
export function touchedBetween(h: ChainHistory, from: number, to: number): Set<number> {
  const all = new Set<number>();
  for (let p = from; p <= to; p++) for (const b of h.touched[p]!) all.add(b);
  return all;
}
