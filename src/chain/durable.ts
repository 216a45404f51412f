/**
 * Durable steps of the chain's files: every write, fsync, rename and unlink that matters goes
 * through here, so the fault-injection switch (src/formats/durable.ts) can fire before any.
 */
import { open, rename, unlink, utimes } from 'node:fs/promises';
import { dirname } from 'node:path';
import { LocalFile } from '../formats/local-file.js';
import type { RandomAccessFile } from '../formats/types.js';
import { durableStep } from '../formats/durable.js';

export { durableStep };

export async function durableWrite(file: RandomAccessFile, data: Uint8Array, at: number): Promise<void> {
  durableStep(`write ${data.length} B at ${at} of ${file.path}`);
  await file.write(data, at);
}

export async function durableFlush(file: RandomAccessFile): Promise<void> {
  durableStep(`fsync ${file.path}`);
  await file.flush();
}

export async function durableRename(from: string, to: string): Promise<void> {
  durableStep(`rename ${from} -> ${to}`);
  await rename(from, to);
}

export async function durableUnlink(path: string): Promise<void> {
  durableStep(`unlink ${path}`);
  await unlink(path);
}

/** fsync of a directory makes the renames and unlinks in it durable. */
export async function syncDir(path: string): Promise<void> {
  durableStep(`fsync dir ${path}`);
  const h = await open(path, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** Writes a small file completely under a temporary name, fsyncs it, renames it into place. */
export async function writeFileAtomic(path: string, data: Uint8Array, mtime?: Date): Promise<void> {
  const tmp = tempPathFor(path);
  const f = await LocalFile.open(tmp, 'wx');
  try {
    await durableWrite(f, data, 0);
    await durableFlush(f);
  } finally {
    await f.close();
  }
  if (mtime) await utimes(tmp, mtime, mtime);
  await durableRename(tmp, path);
  await syncDir(dirname(path));
}

export const TEMP_PREFIX = '.imagekeep-tmp-';

/** A temporary name beside `path` that folder scans ignore and lock holders clean up. */
export function tempPathFor(path: string): string {
  const dir = dirname(path);
  const base = path.slice(dir.length + 1);
  return `${dir}/${TEMP_PREFIX}${process.pid}-${Math.random().toString(36).slice(2, 8)}-${base}`;
}
