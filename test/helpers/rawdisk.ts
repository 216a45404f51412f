// Raw disks without filesystems for format and chain tests: each write has its own pattern,
// so a block read from the wrong point is caught.
import { open } from 'node:fs/promises';
import { imagekeep, prng, sha256File } from './cli.js';

/** Creates a sparse file of `size` bytes with `dataBlocks` random 64 KiB blocks and some text blocks. */
export async function makeRawDisk(path: string, size: number, seed: number, dataBytes = Math.min(size / 2, 8 * 2 ** 20)): Promise<void> {
  const rand = prng(seed);
  const h = await open(path, 'w');
  try {
    await h.truncate(size);
    const chunk = 64 * 1024;
    const count = Math.floor(dataBytes / chunk);
    for (let i = 0; i < count; i++) {
      const at = Math.floor(rand(4).readUInt32LE(0) / 2 ** 32 * (size / chunk)) * chunk;
      const data = i % 3 === 0 ? Buffer.from(`block ${i} of seed ${seed} `.repeat(chunk / 16).slice(0, chunk)) : rand(chunk);
      await h.write(data, 0, Math.min(chunk, size - at), at);
    }
  } finally {
    await h.close();
  }
}

/** Overwrites `count` random extents of 1..maxLen bytes (random positions, any alignment). */
export async function scribble(path: string, seed: number, count: number, maxLen: number): Promise<{ offset: number; length: number }[]> {
  const rand = prng(seed);
  const h = await open(path, 'r+');
  const done: { offset: number; length: number }[] = [];
  try {
    const size = (await h.stat()).size;
    for (let i = 0; i < count; i++) {
      const length = 1 + Math.floor(rand(4).readUInt32LE(0) / 2 ** 32 * maxLen);
      const offset = Math.floor(rand(4).readUInt32LE(0) / 2 ** 32 * (size - length));
      await h.write(rand(length), 0, length, offset);
      done.push({ offset, length });
    }
  } finally {
    await h.close();
  }
  return done;
}

/**
 * A chain of two past days (2026-10-01 and -02), three backups a day at 01, 09 and 17 UTC,
 * of a 2 MiB raw disk in 4 KiB blocks, scribbled on between backups: what `process --now
 * 2026-10-03T00:05Z` collapses into two dailies. Returns the disk's sha256 at each point.
 */
export async function twoDayChain(src: string, folder: string, seed: number): Promise<Map<number, string>> {
  await makeRawDisk(src, 2 * 2 ** 20, seed, 2 ** 20);
  const states = new Map<number, string>();
  let n = 0;
  for (const day of ['2026-10-01', '2026-10-02']) {
    for (const hour of ['01', '09', '17']) {
      if (n > 0) await scribble(src, seed * 10 + n, 3, 20_000);
      const r = await imagekeep(['backup', src, folder, '--block-size', '4096', '--at', `${day}T${hour}:00:00Z`]);
      if (r.code !== 0) throw new Error(`backup of point ${n} failed: ${r.stderr}`);
      states.set(n++, await sha256File(src));
    }
  }
  return states;
}
