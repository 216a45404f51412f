/**
 * Writing a point out: `export --format raw` to a new sparse file, and `restore` onto a
 * block device or a disk image file. Files are written under a temporary name and renamed
 * when complete; a device is written in place (every block, zeros included, since its old
 * content is unknown) after the checks that it is big enough and not mounted.
 */
import { stat, truncate, utimes } from 'node:fs/promises';
import { resolve } from 'node:path';
import { RefusedError, UsageError } from '../formats/errors.js';
import { LocalFile } from '../formats/local-file.js';
import { durableFlush, durableRename, durableUnlink, durableWrite, syncDir, tempPathFor } from './durable.js';
import { blockLength } from './image/layout.js';
import type { PointInTime } from './point.js';
import { mountedUse } from './in-use.js';
import { dirname } from 'node:path';

export interface WriteOutOptions {
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

export interface WriteOutResult {
  path: string;
  bytes: number;
  dataBytes: number;
  seconds: number;
}

/** Copies the point's blocks into `file`; zero blocks are skipped when `sparse`. */
async function copyPoint(point: PointInTime, file: LocalFile, sparse: boolean, opts: WriteOutOptions): Promise<number> {
  let dataBytes = 0;
  const zero = sparse ? null : Buffer.alloc(point.blockSize);
  // Decoding is synchronous; a small window of reads in flight keeps the disk busy meanwhile.
  // Every promise in the window is handled at once so one failure cannot go unobserved.
  const window = 8;
  const pending: Promise<void>[] = [];
  let failure: unknown = null;
  const track = (p: Promise<void>) => pending.push(p.catch((e) => { failure ??= e; }));
  for (let b = 0; b < point.blockCount && failure === null; b++) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
    const at = b * point.blockSize;
    const loc = point.locate(b);
    if (loc) {
      track(loc.image.readBlock(loc.pos).then((data) => { dataBytes += data.length; return durableWrite(file, data, at); }));
    } else if (zero) {
      track(durableWrite(file, zero.subarray(0, blockLength(b, point.size, point.blockSize)), at));
    }
    if (pending.length >= window) await pending.shift();
    if (b % 256 === 0) opts.onProgress?.(at, point.size);
  }
  await Promise.all(pending);
  if (failure !== null) throw failure;
  opts.onProgress?.(point.size, point.size);
  return dataBytes;
}

export async function exportRaw(point: PointInTime, out: string, opts: WriteOutOptions & { force?: boolean } = {}): Promise<WriteOutResult> {
  const started = Date.now();
  const path = resolve(out);
  const existing = await stat(path).catch(() => null);
  if (existing && !opts.force) throw new UsageError(`${out} exists; choose a new name or pass --force to replace it`);
  if (existing && !existing.isFile()) throw new UsageError(`${out} is not a regular file; use restore to write a device`);
  return writeFileTarget(point, path, point.size, started, opts);
}

async function writeFileTarget(point: PointInTime, path: string, size: number, started: number, opts: WriteOutOptions): Promise<WriteOutResult> {
  const tmp = tempPathFor(path);
  const file = await LocalFile.open(tmp, 'wx');
  try {
    await truncate(tmp, size);
    const dataBytes = await copyPoint(point, file, true, opts);
    await durableFlush(file);
    await file.close();
    const t = new Date(point.top.header.pointTime);
    await utimes(tmp, t, t);
    await durableRename(tmp, path);
    await syncDir(dirname(path));
    return { path, bytes: size, dataBytes, seconds: (Date.now() - started) / 1000 };
  } catch (e) {
    await file.close().catch(() => {});
    await durableUnlink(tmp).catch(() => {});
    throw e;
  }
}

export async function restore(point: PointInTime, target: string, opts: WriteOutOptions = {}): Promise<WriteOutResult> {
  const started = Date.now();
  const path = resolve(target);
  const st = await stat(path).catch(() => null);
  if (st && !st.isFile() && !st.isBlockDevice()) throw new UsageError(`${target} is neither a block device nor a regular file`);
  if (st) {
    const use = await mountedUse(path);
    if (use) throw new RefusedError('TARGET_IN_USE', `${target} is in use (${use.by}); unmount it before restoring onto it`);
  }
  if (st?.isBlockDevice()) {
    const dev = await LocalFile.open(path, 'r+');
    try {
      const size = await dev.size();
      if (size < point.size) throw new RefusedError('TARGET_TOO_SMALL', `${target} holds ${size} bytes but the point needs ${point.size}; choose a larger target`);
      const dataBytes = await copyPoint(point, dev, false, opts);
      await durableFlush(dev);
      return { path, bytes: point.size, dataBytes, seconds: (Date.now() - started) / 1000 };
    } finally {
      await dev.close();
    }
  }
  if (st && st.size < point.size) {
    throw new RefusedError('TARGET_TOO_SMALL', `${target} holds ${st.size} bytes but the point needs ${point.size}; choose a larger target or a new file name`);
  }
  // A larger existing file keeps its size; its tail past the point reads as zero.
  return writeFileTarget(point, path, Math.max(point.size, st?.size ?? 0), started, opts);
}
