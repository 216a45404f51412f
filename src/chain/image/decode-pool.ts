/**
 * Decoding of a point's blocks on worker threads. Reading a whole point (export, a standby
 * disk's seed) is bound by zstd and SHA-256; here the main thread only reads records and
 * writes, and the workers decode and check digests.
 *
 * A run's output buffer travels to a worker and back by transfer, never by copy. Records
 * that are already the block's bytes (stored raw, unencrypted: random data) are read
 * straight into their place in that buffer, one read per group of adjacent ones, and the
 * worker only checks their digests in place; the other records are read into a side buffer
 * and the worker inflates them straight into their place. Output and side buffers are
 * recycled (`recycle`), which saves the page faults of fresh 4 MiB buffers.
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { CorruptImageError } from '../../formats/errors.js';
import type { ChainKeys } from './crypto.js';
import { DIGEST_SIZE, STORED_RAW, blockLength } from './layout.js';
import type { PointInTime } from '../point.js';
import type { ImageFile } from './reader.js';

const workerUrl = new URL(import.meta.url.endsWith('.ts') ? './decode-worker.ts' : './decode-worker.js', import.meta.url);

/** Item fields, five numbers per block. */
export const ITEM_FIELDS = 5;
/** `recAt` of a block whose record was read straight into the output: only its digest is checked. */
export const IN_PLACE = -1;
/** Spare buffers kept for reuse, per kind (output, records). */
const SPARES = 8;

export interface DecodeJob {
  id: number;
  /** The run's bytes; holds the in-place blocks already, zeros where nothing is stored. */
  out: ArrayBuffer;
  outLength: number;
  /** The records to decode, concatenated (its ArrayBuffer is handed back for reuse). */
  records: Uint8Array;
  /** Per block: record offset in `records` (or IN_PLACE), record length, storage method, block number, offset in `out`. */
  items: Float64Array;
  lengths: Uint32Array;
  digests: Uint8Array;
  /** Per block, the image's name for error messages. */
  where: string[];
}

export type DecodeReply =
  | { id: number; out: ArrayBuffer; records: ArrayBuffer }
  | { id: number; error: string; corrupt: boolean; block?: number };

export class DecodePool {
  private readonly workers: Worker[];
  private readonly pending = new Map<number, { resolve: (b: Buffer) => void; reject: (e: Error) => void; outLength: number; worker: number }>();
  /** Jobs posted to each worker and not yet answered: a job goes to the least busy. */
  private readonly busy: number[];
  private nextId = 0;
  private failed: Error | null = null;
  /** Output buffers this pool made (so `recycle` takes only those) and spare ones. */
  private readonly issued = new WeakSet<ArrayBuffer>();
  private readonly spareOut: ArrayBuffer[] = [];
  private readonly spareRecords: ArrayBuffer[] = [];

  constructor(keys: ChainKeys | null, size = Math.max(1, availableParallelism())) {
    this.busy = new Array<number>(size).fill(0);
    this.workers = Array.from({ length: size }, () => {
      const w = new Worker(workerUrl, { workerData: { keys } });
      w.on('message', (r: DecodeReply) => {
        const p = this.pending.get(r.id);
        this.pending.delete(r.id);
        if (!p) return;
        this.busy[p.worker]!--;
        if ('out' in r) {
          if (this.spareRecords.length < SPARES && r.records.byteLength > 0) this.spareRecords.push(r.records);
          this.issued.add(r.out);
          p.resolve(Buffer.from(r.out, 0, p.outLength));
        } else p.reject(r.corrupt ? new CorruptImageError(r.error, { block: r.block }) : new Error(r.error));
      });
      w.on('error', (e) => this.fail(e));
      w.on('exit', (code) => {
        if (code !== 0) this.fail(new Error(`decode worker exited with code ${code}`));
      });
      return w;
    });
  }

  private fail(e: Error): void {
    this.failed = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  /**
   * Hands back a buffer `readBlocks` returned, once the caller is done with it (written
   * out): the next run is decoded into it. Buffers from elsewhere are ignored.
   */
  recycle(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    if (buf.byteOffset !== 0 || !this.issued.has(ab) || this.spareOut.length >= SPARES) return;
    this.issued.delete(ab);
    this.spareOut.push(ab);
  }

  private take(spares: ArrayBuffer[], length: number): ArrayBuffer {
    const i = spares.findIndex((b) => b.byteLength >= length);
    if (i < 0) return new ArrayBuffer(length);
    return spares.splice(i, 1)[0]!;
  }

  /**
   * Blocks first..first+count-1 of the point as one buffer (zeros where nothing is stored):
   * the records are read here, each group of adjacent records in one read, and decoded by a worker.
   */
  async readBlocks(point: PointInTime, first: number, count: number): Promise<Buffer> {
    if (this.failed) throw this.failed;
    const bs = point.blockSize;
    const outLength = Math.min((first + count) * bs, point.size) - first * bs;
    const out = this.take(this.spareOut, outLength);
    const outView = new Uint8Array(out, 0, outLength);
    const keyed = point.top.keys !== null;
    const items: number[] = [];
    const lengths: number[] = [];
    const where: string[] = [];
    const digests: Uint8Array[] = [];
    /** Reads to issue once the records buffer exists: into `out` at `outAt`, or into records at `recAt`. */
    const reads: { image: ImageFile; from: number; to: number; outAt: number; recAt: number }[] = [];
    let recBytes = 0;
    let filled = 0;
    for (const run of point.recordRuns(first, count)) {
      const ix = run.image.index;
      const runOut = (run.block - first) * bs;
      if (runOut > filled) outView.fill(0, filled, runOut);
      for (let i = 0; i < run.count; i++) {
        const pos = run.pos + i;
        const block = run.block + i;
        const stored = ix.storedLengths[pos]!;
        const method = ix.flags[pos]! >> 8;
        const length = blockLength(block, point.size, bs);
        const outAt = (block - first) * bs;
        // A damaged length goes the decoding way, which reports it.
        const inPlace = !keyed && method === STORED_RAW && stored === length;
        const last = reads[reads.length - 1];
        // Adjacent records join one read; in place, only if their blocks are adjacent too.
        const joins = last && last.image === run.image && last.to === pos && (last.recAt === IN_PLACE) === inPlace &&
          (!inPlace || last.outAt + (last.to - last.from) * bs === outAt);
        if (joins) last.to++;
        else reads.push({ image: run.image, from: pos, to: pos + 1, outAt, recAt: inPlace ? IN_PLACE : recBytes });
        items.push(inPlace ? IN_PLACE : recBytes, stored, method, block, outAt);
        if (!inPlace) recBytes += stored;
        lengths.push(length);
        digests.push(run.image.digestAt(pos));
        where.push(run.image.name);
      }
      filled = runOut + run.count * bs;
    }
    if (filled < outLength) outView.fill(0, filled, outLength);
    if (items.length === 0) {
      this.issued.add(out);
      return Buffer.from(out, 0, outLength);
    }
    const recordsBuffer = recBytes > 0 ? this.take(this.spareRecords, recBytes) : new ArrayBuffer(0);
    const records = new Uint8Array(recordsBuffer, 0, recBytes);
    try {
      await Promise.all(reads.map((r) => {
        const length = r.image.recordsLength(r.from, r.to);
        const into = r.recAt === IN_PLACE ? outView.subarray(r.outAt, r.outAt + length) : records.subarray(r.recAt, r.recAt + length);
        return r.image.readRecordsInto(r.from, r.to, into);
      }));
    } catch (e) {
      this.spareOut.push(out);
      throw e;
    }
    if (this.failed) throw this.failed;
    const digestBytes = new Uint8Array(digests.length * DIGEST_SIZE);
    digests.forEach((d, i) => digestBytes.set(d, i * DIGEST_SIZE));
    const job: DecodeJob = { id: this.nextId++, out, outLength, records, items: Float64Array.from(items), lengths: Uint32Array.from(lengths), digests: digestBytes, where };
    return new Promise((resolve, reject) => {
      const worker = this.busy.indexOf(Math.min(...this.busy));
      this.busy[worker]!++;
      this.pending.set(job.id, { resolve, reject, outLength, worker });
      this.workers[worker]!.postMessage(job, recBytes > 0 ? [out, recordsBuffer] : [out]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
