/**
 * Verification (SPEC §6). Quick: the MD5 of the whole file against its .md5 sidecar. Deep:
 * the header, trailer and index checksums, then every record decrypted, decompressed and
 * checked against its block digest, so a damaged image is caught even when its .md5 was
 * regenerated from the damaged bytes.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { basename } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { CorruptImageError, ImagekeepError } from '../formats/errors.js';
import type { ReadBackEntries, ReadBackMessage, ReadBackReply, RecordCheckJob } from './image/block-worker.js';
import type { ChainKeys } from './image/crypto.js';
import { DIGEST_SIZE, type ImageIndex } from './image/layout.js';
import { ImageFile, KeyRing } from './image/reader.js';
import { startBlockWorker } from './image/worker-pool.js';
import { readSidecar } from './sidecar.js';

export interface FileCheck {
  name: string;
  ok: boolean;
  /** what failed, in one line; absent when ok */
  reason?: string;
  md5?: string;
  sidecar: 'present' | 'missing';
  /** deep only: did the structure and every block check out (whatever the sidecar says)? */
  blocksOk?: boolean;
}

/** MD5 of a whole file, with two reads in flight so hashing and reading overlap. */
export async function md5OfFile(path: string, signal?: AbortSignal): Promise<string> {
  const h = await open(path, 'r');
  try {
    const size = (await h.stat()).size;
    const md5 = createHash('md5');
    const chunk = 4 * 1024 * 1024;
    const bufs = [Buffer.allocUnsafe(chunk), Buffer.allocUnsafe(chunk)];
    let next: Promise<number> | null = size > 0 ? h.read(bufs[0]!, 0, Math.min(chunk, size), 0).then((r) => r.bytesRead) : null;
    for (let at = 0, k = 0; next; k ^= 1) {
      if (signal?.aborted) throw signal.reason ?? new Error('aborted');
      const n = await next;
      const cur = bufs[k]!;
      at += n;
      next = at < size && n > 0 ? h.read(bufs[k ^ 1]!, 0, Math.min(chunk, size - at), at).then((r) => r.bytesRead) : null;
      md5.update(cur.subarray(0, n));
    }
    return md5.digest('hex');
  } finally {
    await h.close();
  }
}

export async function quickVerify(path: string): Promise<FileCheck> {
  const name = basename(path);
  let want: string | null;
  try {
    want = await readSidecar(path, name);
  } catch (e) {
    return { name, ok: false, reason: (e as Error).message, sidecar: 'present' };
  }
  if (want === null) return { name, ok: false, reason: 'no .md5 sidecar (counts as corrupt until verify --deep --repair re-creates it)', sidecar: 'missing' };
  const got = await md5OfFile(path);
  if (got !== want) return { name, ok: false, reason: `MD5 ${got} does not match its .md5 (${want})`, md5: got, sidecar: 'present' };
  return { name, ok: true, md5: got, sidecar: 'present' };
}

/** Every record decoded and checked; throws CorruptImageError naming the first bad block. */
export async function deepCheck(image: ImageFile, signal?: AbortSignal): Promise<void> {
  const ix = image.index;
  // Records are read in file order in runs of up to 8 MiB, then decoded one by one.
  let i = 0;
  while (i < ix.count) {
    if (signal?.aborted) throw signal.reason ?? new Error('aborted');
    let j = i;
    let bytes = 0;
    while (j < ix.count && (bytes === 0 || bytes + ix.storedLengths[j]! <= 8 * 1024 * 1024)) bytes += ix.storedLengths[j++]!;
    const run = await image.readRecords(i, j);
    let at = 0;
    for (let k = i; k < j; k++) {
      const len = ix.storedLengths[k]!;
      if (!image.isZero(k)) image.decodeRecord(k, run.subarray(at, at + len));
      at += len;
    }
    i = j;
  }
}

/**
 * The read-back check of a file as it is being written (a collapse's output), in a worker
 * thread that follows the writer: it reads every record back, decrypts and decompresses it
 * and checks it against its digest, as deepCheck does. `finish` then opens the file (header,
 * trailer and index checksums, record extents) and requires its index to be the one the
 * records were checked against: together, what a deepCheck of the file proves.
 */
export class ReadBackCheck {
  private readonly worker: Worker;
  private readonly result: Promise<number>;
  private entries: ReadBackEntries & { count: number } = { count: 0, blocks: new Float64Array(0), storedLengths: new Uint32Array(0), flags: new Uint16Array(0), digests: new Uint8Array(0) };
  private path = '';
  private where = 'the output';
  /** The worker's failure, as soon as it reported one. */
  failure: Error | null = null;

  /** Starts the worker: first, so that it comes up while the caller prepares. */
  constructor() {
    this.worker = startBlockWorker({ role: 'records' });
    this.result = new Promise<number>((resolve, reject) => {
      this.worker.on('message', (m: ReadBackReply) => {
        if ('done' in m) resolve(m.done);
        else reject(m.corrupt ? new CorruptImageError(m.error, m.block === undefined ? {} : { block: m.block }) : new Error(`${this.where}: the read-back failed: ${m.error}`));
      });
      this.worker.on('error', (e) => reject(e));
      this.worker.on('exit', (code) => reject(new Error(`${this.where}: the read-back worker exited (code ${code}) before it finished`)));
    });
    this.result.catch((e: Error) => {
      this.failure ??= e;
    });
  }

  /**
   * The file to read back (`where`: its name in messages, the final one), the entries its
   * records will hold (in index order), and what decoding them takes.
   */
  begin(path: string, where: string, entries: ReadBackEntries & { count: number }, keys: ChainKeys | null, shape: { virtualSize: number; blockSize: number }): void {
    this.path = path;
    this.where = where;
    this.entries = entries;
    const n = entries.count;
    // Copies of just the used part, moved to the worker: the caller keeps its arrays.
    const copy: ReadBackEntries = {
      blocks: entries.blocks.slice(0, n), storedLengths: entries.storedLengths.slice(0, n), flags: entries.flags.slice(0, n), digests: entries.digests.slice(0, n * DIGEST_SIZE),
    };
    const job: RecordCheckJob = { keys, virtualSize: shape.virtualSize, blockSize: shape.blockSize, where };
    this.worker.postMessage({ open: path, entries: copy, job } satisfies ReadBackMessage, [copy.blocks.buffer, copy.storedLengths.buffer, copy.flags.buffer, copy.digests.buffer] as ArrayBuffer[]);
  }

  /** Bytes 0..upTo of the file are written. */
  written(upTo: number): void {
    this.worker.postMessage({ upTo } satisfies ReadBackMessage);
  }

  /** The file is complete at `size` bytes: waits for the worker, then checks the structure. */
  async finish(size: number, keyring: KeyRing): Promise<void> {
    this.worker.postMessage({ end: size } satisfies ReadBackMessage);
    const count = await this.result;
    const e = this.entries;
    if (count !== e.count) throw new Error(`${this.where}: the read-back checked ${count} entries of ${e.count}`);
    const image = await ImageFile.open(this.path, keyring);
    try {
      const ix = image.index;
      const at = ix.count !== e.count ? Math.min(ix.count, e.count) : firstDifference(ix, e);
      if (at >= 0) throw new CorruptImageError(`${this.where}: the index read back differs from the one written at entry ${at}; the image is damaged`);
    } finally {
      await image.close();
    }
  }

  async close(): Promise<void> {
    await this.worker.terminate();
  }
}

/** First entry where two indexes of the same length differ (block, length, flags or digest), or -1. */
function firstDifference(a: ImageIndex, b: ReadBackEntries & { count: number }): number {
  for (let i = 0; i < a.count; i++) {
    if (a.blocks[i] !== b.blocks[i] || a.storedLengths[i] !== b.storedLengths[i] || a.flags[i] !== b.flags[i]) return i;
  }
  const n = a.count * DIGEST_SIZE;
  if (Buffer.compare(a.digests.subarray(0, n), b.digests.subarray(0, n)) === 0) return -1;
  for (let i = 0; i < a.count; i++) {
    const s = i * DIGEST_SIZE;
    if (Buffer.compare(a.digests.subarray(s, s + DIGEST_SIZE), b.digests.subarray(s, s + DIGEST_SIZE)) !== 0) return i;
  }
  return -1;
}

/** Deep verification of one file: structure, every block, and the sidecar when present. */
export async function deepVerify(path: string, keyring: KeyRing): Promise<FileCheck> {
  const name = basename(path);
  let image: ImageFile;
  try {
    image = await ImageFile.open(path, keyring);
  } catch (e) {
    if (e instanceof ImagekeepError) return { name, ok: false, reason: e.message.replace(`${name}: `, ''), sidecar: 'present', blocksOk: false };
    throw e;
  }
  try {
    await deepCheck(image);
  } catch (e) {
    if (e instanceof ImagekeepError) return { name, ok: false, reason: e.message.replace(`${name}: `, ''), sidecar: 'present', blocksOk: false };
    throw e;
  } finally {
    await image.close();
  }
  return { ...(await quickVerify(path)), blocksOk: true };
}
