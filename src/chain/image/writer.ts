/**
 * Writes one image in a single sequential pass under a temporary name: header, records as
 * batches arrive, then index and trailer. `commit` makes it durable and visible: fsync
 * (alongside the caller's read-back check, when it has one), the .md5 sidecar (itself via a
 * temporary name), then the rename to the final name. Until then nothing carries a final
 * name; `abort` removes the temporary file.
 *
 * The MD5 of the output is taken from the bytes as they are written, by an OutputHasher: on
 * the calling thread (Md5Inline, the default) or in a worker thread (Md5Worker), for a
 * writer whose thread has enough else to do.
 */
import { createHash, type Hash } from 'node:crypto';
import { utimes } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { Worker } from 'node:worker_threads';
import { LocalFile } from '../../formats/local-file.js';
import { durableFlush, durableRename, durableUnlink, durableWrite, syncDir, tempPathFor } from '../durable.js';
import { OUT_DATA, OUT_ZERO, type BatchResult } from './block-batch.js';
import {
  DIGEST_SIZE, ENTRY_ZERO, HEADER_SIZE, emptyIndex, encodeHeader, encodeIndex, encodeTrailer,
  type ImageHeader, type ImageIndex,
} from './layout.js';
import { md5SidecarText, sidecarPathFor } from '../sidecar.js';

/** The MD5 of everything written, in order. */
export interface OutputHasher {
  /**
   * Adds `data` after everything added before. When it returns a promise, `data` must stay
   * unchanged until that settles (the bytes are hashed elsewhere, later).
   */
  update(data: Uint8Array): Promise<void> | void;
  /** The hex MD5 of everything added; nothing may be added after. */
  digest(): Promise<string>;
  close(): Promise<void>;
}

/** MD5 on the calling thread. */
export class Md5Inline implements OutputHasher {
  private readonly hash: Hash = createHash('md5');
  update(data: Uint8Array): void {
    this.hash.update(data);
  }
  async digest(): Promise<string> {
    return this.hash.digest('hex');
  }
  async close(): Promise<void> {}
}

// Plain CommonJS evaluated in the worker: no module to resolve, the quickest worker to start.
const MD5_WORKER = `
const { parentPort } = require('node:worker_threads');
const md5 = require('node:crypto').createHash('md5');
parentPort.on('message', (m) => {
  if (m.data) {
    md5.update(m.data);
    parentPort.postMessage({ hashed: m.seq });
  } else {
    parentPort.postMessage({ md5: md5.digest('hex') });
  }
});
`;

/**
 * MD5 in a worker thread. A buffer over a SharedArrayBuffer is hashed in place (no copy; the
 * promise of its update settles once it was hashed, and it must not change until then); any
 * other is copied to the worker. Start it early: a worker takes tens of milliseconds to come up.
 */
export class Md5Worker implements OutputHasher {
  private readonly worker: Worker;
  private seq = 0;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private final: { resolve: (md5: string) => void; reject: (e: Error) => void } | null = null;
  private failed: Error | null = null;
  private closed = false;

  constructor() {
    // No inherited flags (a test runner's loader, say): the code above needs none.
    this.worker = new Worker(MD5_WORKER, { eval: true, execArgv: [] });
    this.worker.on('message', (m: { hashed?: number; md5?: string }) => {
      if (m.hashed !== undefined) {
        this.waiting.get(m.hashed)?.resolve();
        this.waiting.delete(m.hashed);
      } else if (m.md5 !== undefined) {
        this.final?.resolve(m.md5);
        this.final = null;
      }
    });
    this.worker.on('error', (e) => this.fail(e));
    this.worker.on('exit', (code) => this.fail(new Error(`the MD5 worker exited (code ${code})${this.closed ? ' when closed' : ''}`)));
  }

  private fail(e: Error): void {
    this.failed ??= e;
    for (const w of this.waiting.values()) w.reject(e);
    this.waiting.clear();
    this.final?.reject(e);
    this.final = null;
  }

  update(data: Uint8Array): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      // Structured clone: a view of shared memory stays shared; anything else is copied.
      this.worker.postMessage({ data, seq });
    });
  }

  digest(): Promise<string> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      this.final = { resolve, reject };
      this.worker.postMessage({});
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.worker.terminate();
  }
}

export interface WriterOptions {
  /** How the output's MD5 is taken; default on the calling thread. The writer closes it. */
  hasher?: OutputHasher;
}

export interface CommitOptions {
  mtime: Date;
  sidecarTime?: Date;
  /**
   * Runs once the index and trailer are written, alongside the fsync and before anything
   * carries a final name: reads the file back and throws when it is not sound (the commit
   * then fails, and `abort` removes the file).
   */
  check?: (written: { path: string; bytes: number }) => Promise<void>;
}

/** Entries to append as they stand in an index (zero entries among them take no bytes). */
export type RecordEntries = Pick<ImageIndex, 'blocks' | 'storedLengths' | 'flags' | 'digests'>;

export interface CommittedImage {
  path: string;
  md5: string;
  bytes: number;
  dataBlocks: number;
  zeroBlocks: number;
}

export class ImageWriter {
  private offset = HEADER_SIZE;
  private index: ImageIndex = emptyIndex(1024);
  private dataBlocks = 0;
  private zeroBlocks = 0;
  private finished = false;
  /** appendRecords writes and syncWritten fsyncs not settled yet */
  private inFlight = 0;
  private hashedHeader: Promise<void> | null = null;

  private constructor(readonly finalPath: string, readonly tempPath: string, private readonly file: LocalFile, readonly header: ImageHeader, private readonly md5: OutputHasher) {}

  static async create(finalPath: string, header: ImageHeader, opts: WriterOptions = {}): Promise<ImageWriter> {
    const md5 = opts.hasher ?? new Md5Inline();
    const tempPath = tempPathFor(finalPath);
    let file: LocalFile;
    try {
      file = await LocalFile.open(tempPath, 'wx');
    } catch (e) {
      await md5.close();
      throw e;
    }
    const w = new ImageWriter(finalPath, tempPath, file, header, md5);
    try {
      const hb = encodeHeader(header);
      // Not waited for here: a worker may still be starting (the digest waits for everything).
      w.hashedHeader = md5.update(hb) ?? null;
      w.hashedHeader?.catch(() => {});
      await durableWrite(file, hb, 0);
    } catch (e) {
      await w.abort();
      throw e;
    }
    return w;
  }

  private grow(need: number): void {
    if (need <= this.index.blocks.length) return;
    const cap = Math.max(need, this.index.blocks.length * 2);
    const bigger = emptyIndex(cap);
    bigger.blocks.set(this.index.blocks);
    bigger.offsets.set(this.index.offsets);
    bigger.storedLengths.set(this.index.storedLengths);
    bigger.flags.set(this.index.flags);
    bigger.digests.set(this.index.digests);
    bigger.count = this.index.count;
    this.index = bigger;
  }

  /** Adds an index entry for one block; data entries must come in the order their records were appended. */
  private addEntry(block: number, storedLength: number, flags: number, digest: Uint8Array | null): void {
    this.grow(this.index.count + 1);
    const i = this.index.count++;
    this.index.blocks[i] = block;
    this.index.offsets[i] = this.offset;
    this.index.storedLengths[i] = storedLength;
    this.index.flags[i] = flags;
    if (digest) this.index.digests.set(digest, i * DIGEST_SIZE);
  }

  /** Appends a batch from the block workers (blocks firstBlock..). */
  async appendBatch(firstBlock: number, r: BatchResult): Promise<void> {
    await this.flushPending();
    for (let i = 0; i < r.kinds.length; i++) {
      const kind = r.kinds[i];
      if (kind === OUT_ZERO) {
        this.addEntry(firstBlock + i, 0, ENTRY_ZERO, null);
        this.zeroBlocks++;
      } else if (kind === OUT_DATA) {
        const len = r.lengths[i]!;
        this.addEntry(firstBlock + i, len, r.methods[i]! << 8, r.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE));
        this.offset += len;
        this.dataBlocks++;
      }
    }
    if (r.records.length > 0) {
      await Promise.all([this.md5.update(r.records), durableWrite(this.file, r.records, this.offset - r.records.length)]);
    }
  }

  /**
   * Appends one already-encoded record (records copied between images one by one).
   * Records are gathered into writes of about 4 MiB: fewer syscalls and durable steps.
   */
  async appendRecord(block: number, record: Uint8Array, flags: number, digest: Uint8Array): Promise<void> {
    this.addEntry(block, record.length, flags, digest);
    this.offset += record.length;
    this.dataBlocks++;
    this.pending.push(record);
    this.pendingBytes += record.length;
    if (this.pendingBytes >= 4 * 1024 * 1024) await this.flushPending();
  }

  private pending: Uint8Array[] = [];
  private pendingBytes = 0;

  private async flushPending(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const data = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    await Promise.all([this.md5.update(data), durableWrite(this.file, data, this.offset - data.length)]);
  }

  /**
   * Appends entries from..to-1 of `entries` (zero entries included), whose records lie back
   * to back in `data`, with one write at the end of the file; `data` is hashed while it is
   * written. Entries and position advance at once, in call order, so the next call may come
   * before this one settles (the caller bounds how many are in flight; `data` must stay
   * unchanged until its call settles; commit requires all settled).
   */
  async appendRecords(entries: RecordEntries, from: number, to: number, data: Uint8Array): Promise<void> {
    if (this.pendingBytes > 0) throw new Error(`${this.tempPath}: appendRecords after appendRecord without a flush`);
    const at = this.offset;
    for (let i = from; i < to; i++) {
      const flags = entries.flags[i]!;
      if (flags & ENTRY_ZERO) {
        this.addEntry(entries.blocks[i]!, 0, ENTRY_ZERO, null);
        this.zeroBlocks++;
      } else {
        const len = entries.storedLengths[i]!;
        this.addEntry(entries.blocks[i]!, len, flags, entries.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE));
        this.offset += len;
        this.dataBlocks++;
      }
    }
    if (this.offset - at !== data.length) {
      throw new RangeError(`${this.tempPath}: entries ${from}..${to - 1} hold ${this.offset - at} bytes of records, the data ${data.length}`);
    }
    if (data.length === 0) return;
    this.inFlight++;
    try {
      // The write is issued (it runs in the thread pool) before the bytes are hashed.
      const written = durableWrite(this.file, data, at);
      let hashed: Promise<void> | void;
      try {
        hashed = this.md5.update(data);
      } catch (e) {
        await written.catch(() => {});
        throw e;
      }
      await Promise.all([written, hashed]);
    } finally {
      this.inFlight--;
    }
  }

  /** fsync of what is written so far, while appending goes on: the commit's fsync then has less left to wait for. */
  async syncWritten(): Promise<void> {
    this.inFlight++;
    try {
      await durableFlush(this.file);
    } finally {
      this.inFlight--;
    }
  }

  /** Bytes the file holds once every append so far is written. */
  get position(): number {
    return this.offset;
  }

  appendZero(block: number): void {
    this.addEntry(block, 0, ENTRY_ZERO, null);
    this.zeroBlocks++;
  }

  /** Index, trailer, fsync (and the caller's check), sidecar, rename. Returns what was committed. */
  async commit(opts: CommitOptions): Promise<CommittedImage> {
    await this.flushPending();
    if (this.inFlight > 0) throw new Error(`${this.tempPath}: commit with ${this.inFlight} writes or fsyncs still in flight`);
    const indexBytes = encodeIndex(this.index);
    const trailer = encodeTrailer({
      indexOffset: this.offset,
      indexLength: indexBytes.length,
      dataBytes: this.offset - HEADER_SIZE,
      indexChecksum: createHash('sha256').update(indexBytes).digest(),
    });
    const hashed = Promise.all([this.hashedHeader, this.md5.update(indexBytes), this.md5.update(trailer)]).then(() => this.md5.digest());
    hashed.catch(() => {}); // awaited below; this only keeps a failure from counting as unhandled meanwhile
    await durableWrite(this.file, indexBytes, this.offset);
    await durableWrite(this.file, trailer, this.offset + indexBytes.length);
    const bytes = this.offset + indexBytes.length + trailer.length;
    // The fsync, the caller's read-back check and the end of the hashing overlap, and the
    // .md5 sidecar is written (under a temporary name, fsynced) as soon as the MD5 is known.
    const sidecarPath = sidecarPathFor(this.finalPath);
    const sidecarTemp = tempPathFor(sidecarPath);
    const flushed = durableFlush(this.file);
    const sidecar = hashed.then((md5) => writeTemp(sidecarTemp, Buffer.from(md5SidecarText(md5, basename(this.finalPath))), opts.sidecarTime ?? opts.mtime));
    const outcomes = await Promise.allSettled([opts.check?.({ path: this.tempPath, bytes }), flushed, hashed, sidecar]);
    const failed = outcomes.find((r) => r.status === 'rejected');
    if (failed) {
      await durableUnlink(sidecarTemp).catch(() => {});
      throw failed.reason;
    }
    const md5 = await hashed;
    await this.file.close();
    this.finished = true;
    await this.md5.close();
    await utimes(this.tempPath, opts.mtime, opts.mtime);
    // The sidecar lands first: a crash between the two renames leaves an .md5 without
    // its image (garbage that `process` removes), never an image without its .md5.
    await durableRename(sidecarTemp, sidecarPath);
    await syncDir(dirname(sidecarPath));
    await durableRename(this.tempPath, this.finalPath);
    await syncDir(dirname(this.finalPath));
    return { path: this.finalPath, md5, bytes, dataBlocks: this.dataBlocks, zeroBlocks: this.zeroBlocks };
  }

  async abort(): Promise<void> {
    if (!this.finished) {
      this.finished = true;
      await this.file.close().catch(() => {});
    }
    await this.md5.close().catch(() => {});
    await durableUnlink(this.tempPath).catch(() => {});
  }
}

/** A small file written completely under the name `path` and fsynced (the caller renames it into place). */
async function writeTemp(path: string, data: Uint8Array, mtime: Date): Promise<void> {
  const f = await LocalFile.open(path, 'wx');
  try {
    await durableWrite(f, data, 0);
    await durableFlush(f);
  } finally {
    await f.close();
  }
  await utimes(path, mtime, mtime);
}
