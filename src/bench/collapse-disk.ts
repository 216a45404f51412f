/**
 * Disk generation shared by the collapse and verify benchmarks: a sparse disk file holding
 * chunks of mixed data, and "hours" of 64 KiB block rewrites (random data) with the
 * changed-blocks file that lets an incremental read only what changed.
 */
import { randomFillSync } from 'node:crypto';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { KiB, MiB, type Rng } from './common.js';
import { TextGen } from './datagen.js';

export const BLOCK = 64 * KiB;
export type Kind = 'random' | 'text' | 'zero';

export interface Chunk {
  at: number;
  len: number;
  kind: Kind;
}

/** A chunk length of 1-7 MiB, 64 KiB aligned. */
function chunkLength(rng: Rng): number {
  return (16 + rng.int(97)) * BLOCK;
}

/** Chunks back to back over the whole disk, kinds in shuffled runs of one each (so ~equal shares). */
export function contiguousChunks(size: number, rng: Rng, kinds: Kind[]): Chunk[] {
  const chunks: Chunk[] = [];
  let order: Kind[] = [];
  for (let at = 0; at < size;) {
    if (order.length === 0) order = rng.shuffle([...kinds]);
    const len = Math.min(size - at, chunkLength(rng));
    chunks.push({ at, len, kind: order.pop()! });
    at += len;
  }
  return chunks;
}

/**
 * About `total` bytes of chunks spread evenly over the disk (one chunk at the start of each
 * equal slot, holes between), kinds in shuffled runs of one each.
 */
export function spreadChunks(size: number, total: number, rng: Rng, kinds: Kind[]): Chunk[] {
  const lens: number[] = [];
  for (let sum = 0; sum < total;) {
    const len = Math.min(total - sum, chunkLength(rng));
    lens.push(len);
    sum += len;
  }
  const slot = Math.floor(size / lens.length / BLOCK) * BLOCK;
  let order: Kind[] = [];
  return lens.map((len, k) => {
    if (order.length === 0) order = rng.shuffle([...kinds]);
    return { at: k * slot, len: Math.min(len, slot), kind: order.pop()! };
  });
}

/** Creates a sparse file of `size` bytes and writes the chunks (zero chunks stay holes). */
export async function writeDisk(path: string, size: number, chunks: Chunk[], rng: Rng): Promise<Record<Kind, number>> {
  const f = await open(path, 'wx');
  const text = new TextGen(rng);
  const piece = Buffer.alloc(8 * MiB);
  const bytes: Record<Kind, number> = { random: 0, text: 0, zero: 0 };
  try {
    await f.truncate(size);
    for (const c of chunks) {
      bytes[c.kind] += c.len;
      if (c.kind === 'zero') continue;
      for (let done = 0; done < c.len;) {
        const n = Math.min(piece.length, c.len - done);
        const data = piece.subarray(0, n);
        if (c.kind === 'random') randomFillSync(data);
        else text.fill(data);
        await f.write(data, 0, n, c.at + done);
        done += n;
      }
    }
    await f.sync();
  } finally {
    await f.close();
  }
  return bytes;
}

/** `count` distinct blocks of [0, blockCount), in random order. */
function distinct(rng: Rng, count: number, blockCount: number, exclude?: Set<number>): number[] {
  const set = new Set<number>();
  while (set.size < count) {
    const b = rng.int(blockCount);
    if (!exclude?.has(b)) set.add(b);
  }
  return [...set];
}

/**
 * The blocks each hour rewrites: `perHour` distinct blocks, half drawn from a fixed hot set
 * of `hotCount` blocks (so hours overlap), half uniform over the disk. Sorted per hour.
 */
export function pickHours(rng: Rng, blockCount: number, hours: number, perHour: number, hotCount: number): number[][] {
  const hot = distinct(rng, hotCount, blockCount);
  const out: number[][] = [];
  for (let h = 0; h < hours; h++) {
    const fromHot = Math.min(hotCount, Math.floor(perHour / 2));
    const picked = new Set(rng.shuffle([...hot]).slice(0, fromHot));
    for (const b of distinct(rng, perHour - fromHot, blockCount, picked)) picked.add(b);
    out.push([...picked].sort((a, b) => a - b));
  }
  return out;
}

/** Writes the "OFFSET LENGTH" lines of `--changed-blocks` (adjacent blocks merged). */
export async function writeChangedBlocks(path: string, blocks: number[], size: number): Promise<void> {
  const lines: string[] = [];
  for (let i = 0; i < blocks.length;) {
    let j = i + 1;
    while (j < blocks.length && blocks[j] === blocks[j - 1]! + 1) j++;
    const at = blocks[i]! * BLOCK;
    lines.push(`${at} ${Math.min(size, blocks[j - 1]! * BLOCK + BLOCK) - at}`);
    i = j;
  }
  await writeFile(path, lines.join('\n') + '\n');
}

/**
 * Overwrites `blocks` of the disk with fresh random data (fsynced). With `copyDir`, each
 * block's bytes also land in `copyDir/<block>.bin` for replaying into another format;
 * returns those file names (empty without copyDir).
 */
export async function rewriteBlocks(path: string, size: number, blocks: number[], copyDir?: string): Promise<string[]> {
  const f = await open(path, 'r+');
  const buf = Buffer.alloc(BLOCK);
  const files: string[] = [];
  if (copyDir) {
    await rm(copyDir, { recursive: true, force: true });
    await mkdir(copyDir, { recursive: true });
  }
  try {
    for (const b of blocks) {
      const n = Math.min(BLOCK, size - b * BLOCK);
      randomFillSync(buf, 0, n);
      await f.write(buf, 0, n, b * BLOCK);
      if (copyDir) {
        const file = join(copyDir, `${b}.bin`);
        await writeFile(file, buf.subarray(0, n));
        files.push(file);
      }
    }
    await f.sync();
  } finally {
    await f.close();
  }
  return files;
}
