/**
 * Decoding of a point's blocks on worker threads. Reading a whole point (export, a standby
 * disk's seed) is bound by zstd and SHA-256 on one core; here the main thread only reads
 * records (runs of adjacent records in one pread) and writes, and the workers decode.
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { CorruptImageError } from '../../formats/errors.js';
import type { ChainKeys } from './crypto.js';
import { DIGEST_SIZE, blockLength } from './layout.js';
import type { PointInTime } from '../point.js';

const workerUrl = new URL(import.meta.url.endsWith('.ts') ? './decode-worker.ts' : './decode-worker.js', import.meta.url);

export interface DecodeJob {
  id: number;
  /** The records, concatenated. */
  records: Uint8Array;
  /** Per block, five numbers: record offset in `records`, record length, storage method, block number, offset in the output. */
  items: Float64Array;
  lengths: Uint32Array;
  digests: Uint8Array;
  /** Per block, the image's name for error messages. */
  where: string[];
  outLength: number;
}

export type DecodeReply = { id: number; out: Uint8Array } | { id: number; error: string; corrupt: boolean; block?: number };

export class DecodePool {
  private readonly workers: Worker[];
  private readonly pending = new Map<number, { resolve: (b: Buffer) => void; reject: (e: Error) => void }>();
  private nextId = 0;
  private failed: Error | null = null;

  constructor(keys: ChainKeys | null, size = Math.max(1, availableParallelism())) {
    this.workers = Array.from({ length: size }, () => {
      const w = new Worker(workerUrl, { workerData: { keys } });
      w.on('message', (r: DecodeReply) => {
        const p = this.pending.get(r.id);
        this.pending.delete(r.id);
        if (!p) return;
        if ('out' in r) p.resolve(Buffer.from(r.out.buffer, r.out.byteOffset, r.out.byteLength));
        else p.reject(r.corrupt ? new CorruptImageError(r.error, { block: r.block }) : new Error(r.error));
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
   * Blocks first..first+count-1 of the point as one buffer (zeros where nothing is stored):
   * the records are read here, each run of adjacent records in one read, and decoded by a worker.
   */
  async readBlocks(point: PointInTime, first: number, count: number): Promise<Buffer> {
    if (this.failed) throw this.failed;
    const outLength = Math.min((first + count) * point.blockSize, point.size) - first * point.blockSize;
    const reads: Promise<Buffer>[] = [];
    const items: number[] = [];
    const lengths: number[] = [];
    const where: string[] = [];
    const digests: Uint8Array[] = [];
    let recAt = 0;
    for (const run of point.recordRuns(first, count)) {
      reads.push(run.image.readRecords(run.pos, run.pos + run.count));
      for (let i = 0; i < run.count; i++) {
        const pos = run.pos + i;
        const block = run.block + i;
        const stored = run.image.index.storedLengths[pos]!;
        items.push(recAt, stored, run.image.index.flags[pos]! >> 8, block, (block - first) * point.blockSize);
        lengths.push(blockLength(block, point.size, point.blockSize));
        digests.push(run.image.digestAt(pos));
        where.push(run.image.name);
        recAt += stored;
      }
    }
    if (items.length === 0) return Buffer.alloc(outLength);
    const parts = await Promise.all(reads);
    const records = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const digestBytes = new Uint8Array(digests.length * DIGEST_SIZE);
    digests.forEach((d, i) => digestBytes.set(d, i * DIGEST_SIZE));
    const job: DecodeJob = { id: this.nextId++, records, items: Float64Array.from(items), lengths: Uint32Array.from(lengths), digests: digestBytes, where, outLength };
    return new Promise((resolve, reject) => {
      this.pending.set(job.id, { resolve, reject });
      const w = this.workers[job.id % this.workers.length]!;
      // A record buffer from Buffer.concat or a pread is its own ArrayBuffer unless it is small enough to come from the pool.
      const own = records.byteOffset === 0 && records.byteLength === records.buffer.byteLength;
      w.postMessage(job, own ? [records.buffer as ArrayBuffer] : []);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
