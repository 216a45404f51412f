/**
 * A point in time as a cached block device for the FUSE view. Design:
 *
 * - An LRU of decoded blocks (default 64 MiB), so a block read twice — the kernel's 128 KiB
 *   requests split a 1 MiB block; fsck revisits metadata — is decompressed and checked once.
 * - Concurrent reads of the same block share one fetch (an in-flight map).
 * - Read-ahead: when a read starts where an earlier one of the same stream ended, the next
 *   `readAheadBlocks` blocks are fetched in the background with `readBlocks`, which reads
 *   records lying back to back in one image with one pread. Up to 8 streams are tracked, so
 *   eight sequential readers each keep their read-ahead.
 * - Zero blocks (nothing stored, or recorded as zero) never touch the cache.
 * - A block that fails its digest is never cached: the read that needed it rejects with the
 *   CorruptImageError (image and block named), and a read-ahead that hit it is dropped
 *   silently — only a read the caller asked for reports it.
 */
import type { BlockDevice } from '../formats/types.js';
import type { PointInTime } from '../chain/point.js';

export interface CacheOptions {
  /** Bytes of decoded blocks to keep (default 64 MiB). */
  cacheBytes?: number;
  /** Blocks to fetch ahead of a sequential reader (default: 2 MiB worth, at least 2). */
  readAheadBlocks?: number;
}

export interface CacheStats {
  hits: number;
  misses: number;
  readAheadBlocks: number;
}

const STREAMS = 8;

export class CachedPoint implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly stats: CacheStats = { hits: 0, misses: 0, readAheadBlocks: 0 };
  private readonly capacity: number;
  private readonly readAhead: number;
  /** Map iteration order is insertion order: re-inserting on a hit makes it an LRU. */
  private readonly blocks = new Map<number, Buffer>();
  private readonly inFlight = new Map<number, Promise<Buffer>>();
  /** Recent readers, oldest first: where each will read next (bytes) and the block its read-ahead reached. */
  private readonly streams: { next: number; ahead: number }[] = [];

  constructor(readonly point: PointInTime, opts: CacheOptions = {}) {
    this.size = point.size;
    this.blockSize = point.blockSize;
    this.capacity = Math.max(4, Math.floor((opts.cacheBytes ?? 64 * 2 ** 20) / point.blockSize));
    this.readAhead = opts.readAheadBlocks ?? Math.max(2, Math.ceil((2 * 2 ** 20) / point.blockSize));
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (!Number.isSafeInteger(at) || at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the point's size ${this.size}`);
    }
    if (into.length === 0) return;
    const first = Math.floor(at / this.blockSize);
    const last = Math.floor((at + into.length - 1) / this.blockSize);
    this.noteStream(at, at + into.length, last);
    const parts: Promise<void>[] = [];
    for (let b = first; b <= last; b++) {
      const blockStart = b * this.blockSize;
      const from = Math.max(at, blockStart);
      const to = Math.min(at + into.length, blockStart + this.blockSize);
      const dst = from - at;
      if (this.point.locate(b) === null) {
        into.fill(0, dst, dst + (to - from));
        continue;
      }
      parts.push(this.block(b).then((data) => {
        into.set(data.subarray(from - blockStart, to - blockStart), dst);
      }));
    }
    await Promise.all(parts);
  }

  /** One decoded block: from the cache, a fetch already under way, or a new fetch. */
  private block(b: number): Promise<Buffer> {
    const hit = this.blocks.get(b);
    if (hit) {
      this.stats.hits++;
      this.blocks.delete(b);
      this.blocks.set(b, hit);
      return Promise.resolve(hit);
    }
    const pending = this.inFlight.get(b);
    if (pending) {
      this.stats.hits++;
      return pending;
    }
    this.stats.misses++;
    const p = this.point.readBlock(b).then((data) => {
      this.put(b, data);
      return data;
    }).finally(() => this.inFlight.delete(b));
    this.inFlight.set(b, p);
    return p;
  }

  private put(b: number, data: Buffer): void {
    this.blocks.delete(b);
    this.blocks.set(b, data);
    while (this.blocks.size > this.capacity) {
      const oldest = this.blocks.keys().next().value as number;
      this.blocks.delete(oldest);
    }
  }

  /**
   * Records a read. A read continuing a known stream keeps a window of `readAhead` blocks
   * fetched past it, topped up in one batch whenever less than half of it remains, so the
   * fetches stay long runs (one pread each) rather than one block per kernel request.
   */
  private noteStream(start: number, end: number, lastBlock: number): void {
    const i = this.streams.findIndex((s) => s.next === start);
    const stream = i >= 0 ? this.streams.splice(i, 1)[0]! : { next: end, ahead: 0 };
    stream.next = end;
    this.streams.push(stream);
    if (this.streams.length > STREAMS) this.streams.shift();
    if (i < 0) return;
    if (stream.ahead - (lastBlock + 1) > this.readAhead / 2) return;
    const from = Math.max(stream.ahead, lastBlock + 1);
    const until = Math.min(lastBlock + 1 + this.readAhead, Math.ceil(this.size / this.blockSize));
    if (from >= until) return;
    stream.ahead = until;
    void this.prefetch(from, until);
  }

  /** Fetches blocks [from, until) that are neither cached nor under way, in runs, ignoring failures. */
  private async prefetch(from: number, until: number): Promise<void> {
    let b = from;
    const runs: Promise<void>[] = [];
    while (b < until) {
      if (this.blocks.has(b) || this.inFlight.has(b) || this.point.locate(b) === null) {
        b++;
        continue;
      }
      let n = 1;
      while (b + n < until && !this.blocks.has(b + n) && !this.inFlight.has(b + n) && this.point.locate(b + n) !== null) n++;
      runs.push(this.fetchRun(b, n));
      b += n;
    }
    await Promise.all(runs);
  }

  private fetchRun(first: number, count: number): Promise<void> {
    const buf = Buffer.allocUnsafe(count * this.blockSize);
    const whole = this.point.readBlocks(first, count, buf);
    for (let i = 0; i < count; i++) {
      const b = first + i;
      const length = Math.min(this.blockSize, this.size - b * this.blockSize);
      const p = whole.then(() => {
        const data = buf.subarray(i * this.blockSize, i * this.blockSize + length);
        this.put(b, data);
        return data;
      });
      // A demand read that finds this block in flight gets the data; if the run failed (a bad
      // block anywhere in it), that read fetches its own block and gets its own verdict.
      const shared = p.catch(() => this.point.readBlock(b).then((data) => {
        this.put(b, data);
        return data;
      })).finally(() => this.inFlight.delete(b));
      shared.catch(() => undefined); // nobody may ask for it; a failure then is nobody's business
      this.inFlight.set(b, shared);
    }
    this.stats.readAheadBlocks += count;
    return whole.catch(() => undefined);
  }

  async close(): Promise<void> {
    this.blocks.clear();
    await this.point.close();
  }
}
