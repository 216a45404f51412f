/**
 * A VHDX file as it reads after its pending log is replayed, without writing to it.
 *
 * MS-VHDX says a reader must replay the log before trusting the BAT or the metadata; qemu
 * refuses a read-only open instead, and libvhdi ignores the log and returns stale data. We
 * apply the log's sectors as an in-memory overlay over the file's bytes, so the source file is
 * never modified: every later read of metadata (and of payload, should a log entry touch it)
 * goes through this view. A writer that grows the file in place writes the overlay into the
 * file once, then drops it (`materialize`).
 */
import { alignUp } from '../bytes.js';
import { CorruptImageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import { MiB, type LogEntry } from './codec.js';

interface Patch {
  offset: number;
  length: number;
  /** Absent for a zero descriptor. */
  data?: Uint8Array;
  /** Application order: a later patch wins where two overlap. */
  order: number;
}

export class ReplayedFile {
  /** The bytes the file really has. */
  realSize: number;
  /** The size after replay: a log may extend the file (LastFileOffset, rounded up to 1 MiB). */
  size: number;
  /** Sorted by offset; applied in `order` where they overlap. */
  private patches: Patch[];
  private longest: number;

  constructor(readonly file: RandomAccessFile, realSize: number, entries: LogEntry[] = []) {
    this.realSize = realSize;
    this.size = realSize;
    const patches: Patch[] = [];
    for (const e of entries) {
      // A FlushedFileOffset past the end means the file lost bytes the log relies on (qemu refuses too).
      if (e.flushedFileOffset > realSize) {
        throw new CorruptImageError(
          `the VHDX log entry ${e.sequenceNumber} expects the file to be at least ${e.flushedFileOffset} bytes long, but it has ${realSize}: the file is truncated; copy it again`,
        );
      }
      for (const d of e.descriptors) {
        if (d.kind === 'data') patches.push({ offset: d.fileOffset, length: d.sector.length, data: d.sector, order: patches.length });
        else if (d.length > 0) patches.push({ offset: d.fileOffset, length: d.length, order: patches.length });
      }
      if (e.lastFileOffset > this.size) this.size = alignUp(e.lastFileOffset, MiB);
    }
    // A descriptor may also write past the old end; the file then grows to hold it.
    for (const p of patches) if (p.offset + p.length > this.size) this.size = p.offset + p.length;
    patches.sort((a, b) => a.offset - b.offset || a.order - b.order);
    this.patches = patches;
    this.longest = patches.reduce((n, p) => Math.max(n, p.length), 0);
  }

  get pending(): boolean {
    return this.patches.length > 0 || this.size !== this.realSize;
  }

  /** The replayed sectors and zero ranges (no data), in the order a replay must write them. */
  replayWrites(): { offset: number; length: number; data?: Uint8Array }[] {
    return [...this.patches].sort((a, b) => a.order - b.order).map((p) => ({ offset: p.offset, length: p.length, data: p.data }));
  }

  /** After the overlay was written into the file: reads go straight to the file. */
  materialize(): void {
    this.patches = [];
    this.longest = 0;
    this.realSize = this.size;
  }

  /** The file grew (a writer allocated blocks). */
  grow(size: number): void {
    if (size > this.size) this.size = size;
    if (size > this.realSize) this.realSize = size;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    const end = at + into.length;
    if (at < 0 || end > this.size) {
      throw new RangeError(`${this.file.path}: read of ${into.length} bytes at ${at} passes the end of the file (${this.size} bytes)`);
    }
    const real = Math.max(0, Math.min(end, this.realSize) - at);
    if (real > 0) await this.file.read(into.subarray(0, real), at);
    if (real < into.length) into.fill(0, real);
    if (this.patches.length === 0) return;
    // Patches that can overlap start after at - longest; binary search the first of them.
    let lo = 0;
    let hi = this.patches.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.patches[mid].offset < at - this.longest) lo = mid + 1;
      else hi = mid;
    }
    const hits: Patch[] = [];
    for (let i = lo; i < this.patches.length && this.patches[i].offset < end; i++) {
      const p = this.patches[i];
      if (p.offset + p.length > at) hits.push(p);
    }
    hits.sort((a, b) => a.order - b.order);
    for (const p of hits) {
      const from = Math.max(at, p.offset);
      const to = Math.min(end, p.offset + p.length);
      if (p.data) into.set(p.data.subarray(from - p.offset, to - p.offset), from - at);
      else into.fill(0, from - at, to - at);
    }
  }
}
