/**
 * Writing a streamOptimized VMDK, the OVF/vSphere upload format, in VMware's own layout:
 * header (GD_AT_END) and descriptor, then for each 64 KiB grain that is not all zeros a
 * grain marker {lba, size} and its zlib data padded to a sector; after each 32 MiB the
 * grain table (GT marker + GT) of the grains before it; at the end the grain directory
 * (GD marker + GD), the footer (footer marker + a copy of the header holding the GD's
 * sector) and the end-of-stream sector. GT entries point at grain markers. qemu's own
 * layout (tables up front, no markers) is reportedly refused by VMware imports
 * (formats.md §3.2).
 *
 * The file is written once from start to end, so writes must come in ascending order;
 * a partial grain waits in memory for the rest of its bytes. Grains are compressed on the
 * libuv thread pool, several at a time, and written in order.
 */
import { randomBytes } from 'node:crypto';
import { deflate } from 'node:zlib';
import { promisify } from 'node:util';
import { SECTOR, ceilDiv } from '../bytes.js';
import type { CreateOptions, DiskWriter } from '../disk-image.js';
import { CorruptImageError, UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  COMPRESSION_DEFLATE,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NEWLINE_TEST,
  GRAIN_MARKER_SIZE,
  MARKER_FOOTER,
  MARKER_GD,
  MARKER_GT,
  MAX_SPARSE_FILE_SECTORS,
  baseName,
  isZero,
  metadataMarker,
  newDescriptor,
  serializeDescriptor,
  serializeSparseHeader,
  serializeTable,
  tableSectors,
  writeGrainMarker,
  type SparseHeader,
} from './codec.js';
import { inflateGrainAt, readTable } from './sparse-extent.js';
import { DESCRIPTOR_SECTORS, checkWrite, grainSectorsFrom } from './sparse-writer.js';

const deflateAsync = promisify(deflate) as (buf: Uint8Array, options: { level: number }) => Promise<Buffer>;

/** VMware's overhead before the first grain, in sectors. */
const STREAM_OVERHEAD = 128;
const GTES_PER_GT = 512;
/**
 * zlib level for grains that compress. python3-vmdkstream (our size reference) uses 6.
 * Measured on 64 KiB grains: level 5 comes out at most 1.5% larger than 6 (JavaScript
 * source; 0.7% on the benchmark's text-like data) in 0.65-0.8 of the time; level 4 is faster
 * still but 5.8% larger on source code, past the 5% we allow. Incompressible grains are
 * stored (below) whatever this says.
 */
export const STREAM_DEFLATE_LEVEL = 5;
/**
 * Above this many bits per byte (order-0 entropy of a 4 KiB sample), deflate cannot shrink a
 * grain by more than a percent or two (random, encrypted, already compressed data), so it is
 * stored (level 0: still a zlib stream every reader inflates) at memcpy speed instead of
 * searched at ~30 MB/s.
 */
const INCOMPRESSIBLE_BITS = 7.8;
/** Grains being compressed at once: enough to keep the 4 libuv threads busy while we write. */
const IN_FLIGHT = 16;
/** Output is written in pieces of about this size. */
const OUT_CHUNK = 1024 * 1024;

export async function createStream(file: RandomAccessFile, options: CreateOptions): Promise<StreamWriter> {
  const capacity = options.size / SECTOR;
  const grainSize = grainSectorsFrom(options.blockSize);
  const descriptor = newDescriptor({
    createType: 'streamOptimized',
    sectors: capacity,
    extentType: 'SPARSE',
    // VMware's exports mark the extent read-only: a stream cannot be written in place
    access: 'RDONLY',
    fileName: baseName(options.finalName),
    random: randomBytes(36),
  });
  const text = Buffer.from(serializeDescriptor(descriptor), 'utf8');
  if (text.length > DESCRIPTOR_SECTORS * SECTOR) {
    throw new UsageError(`the file name "${options.finalName}" makes the VMDK descriptor longer than its ${DESCRIPTOR_SECTORS * SECTOR} bytes; choose a shorter name`);
  }
  const header: SparseHeader = {
    version: 3,
    flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
    capacity,
    grainSize,
    descriptorOffset: 1,
    descriptorSize: DESCRIPTOR_SECTORS,
    numGTEsPerGT: GTES_PER_GT,
    rgdOffset: 0,
    gdOffset: 0,
    gdAtEnd: true,
    overHead: STREAM_OVERHEAD,
    uncleanShutdown: false,
    newlineBytesIntact: true,
    compressAlgorithm: COMPRESSION_DEFLATE,
  };
  const head = new Uint8Array(STREAM_OVERHEAD * SECTOR);
  head.set(serializeSparseHeader(header), 0);
  head.set(text, SECTOR);
  await file.write(head, 0);
  return new StreamWriter(file, header);
}

/** Order-0 entropy in bits per byte of 16 slices of 256 bytes spread over the grain. */
export function sampleEntropy(grain: Uint8Array): number {
  const counts = new Uint32Array(256);
  const slices = 16;
  const len = Math.min(256, Math.floor(grain.length / slices));
  const step = Math.floor(grain.length / slices);
  let total = 0;
  for (let s = 0; s < slices; s++) {
    const base = s * step;
    for (let i = 0; i < len; i++) counts[grain[base + i]!]!++;
    total += len;
  }
  let h = 0;
  for (let b = 0; b < 256; b++) {
    const c = counts[b]!;
    if (c > 0) {
      const p = c / total;
      h -= p * Math.log2(p);
    }
  }
  return h;
}

interface Job {
  grain: number;
  data: Promise<Buffer>;
}

export class StreamWriter implements DiskWriter {
  readonly format = 'vmdk';
  readonly subformat = 'streamOptimized';
  readonly size: number;
  private readonly grainBytes: number;
  private readonly grainCount: number;
  /** Where the next record goes in the file. */
  private pos = STREAM_OVERHEAD * SECTOR;
  /** Disk bytes below this have been handed to write(); writes may not go back below it. */
  private writtenEnd = 0;
  private partial: { grain: number; buf: Uint8Array } | null = null;
  private readonly jobs: Job[] = [];
  private readonly gd: Uint32Array;
  private readonly gt = new Uint32Array(GTES_PER_GT);
  private gtIndex = 0;
  private out: Uint8Array[] = [];
  private outBytes = 0;
  private outStart = STREAM_OVERHEAD * SECTOR;
  private queue: Promise<unknown> = Promise.resolve();
  private state: 'open' | 'closed' | 'failed' = 'open';

  constructor(
    private readonly file: RandomAccessFile,
    private readonly header: SparseHeader,
  ) {
    this.size = header.capacity * SECTOR;
    this.grainBytes = header.grainSize * SECTOR;
    this.grainCount = ceilDiv(header.capacity, header.grainSize);
    this.gd = new Uint32Array(ceilDiv(this.grainCount, GTES_PER_GT));
  }

  private serial<T>(op: () => Promise<T>): Promise<T> {
    if (this.state !== 'open') {
      return Promise.reject(new UsageError(`${this.file.path}: the streamOptimized writer is ${this.state === 'closed' ? 'closed' : 'stopped after an earlier error'}`));
    }
    const p = this.queue.then(op).catch((e: unknown) => {
      // a stream with a hole in its sequence cannot be finished correctly
      this.state = 'failed';
      throw e;
    });
    this.queue = p.catch(() => {});
    return p;
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    checkWrite(from, at, this.size, this.file.path);
    if (at < this.writtenEnd) {
      throw new UsageError(
        `${this.file.path}: a streamOptimized VMDK is written once from start to end; a write at ${at} comes after data up to ${this.writtenEnd} (write ascending, or use monolithicSparse for random writes)`,
      );
    }
    this.writtenEnd = at + from.length;
    return this.serial(() => this.doWrite(from, at));
  }

  private async doWrite(from: Uint8Array, at: number): Promise<void> {
    const gb = this.grainBytes;
    let done = 0;
    while (done < from.length) {
      const pos = at + done;
      const grain = Math.floor(pos / gb);
      const inGrain = pos - grain * gb;
      const n = Math.min(gb - inGrain, from.length - done);
      const part = from.subarray(done, done + n);
      if (this.partial && this.partial.grain !== grain) await this.submitPartial();
      // the disk's last grain may be short: it is complete when the disk's end is reached
      const grainEnd = Math.min(gb, this.size - grain * gb);
      if (inGrain === 0 && n === grainEnd && n === gb && !this.partial) {
        // copied: the caller may reuse its buffer once write() returns, before deflate runs
        if (!isZero(part)) await this.submit(grain, new Uint8Array(part));
      } else {
        if (!this.partial) this.partial = { grain, buf: new Uint8Array(gb) };
        this.partial.buf.set(part, inGrain);
        if (inGrain + n === grainEnd) await this.submitPartial();
      }
      done += n;
    }
  }

  private async submitPartial(): Promise<void> {
    const p = this.partial!;
    this.partial = null;
    if (!isZero(p.buf)) await this.submit(p.grain, p.buf);
  }

  private async submit(grain: number, data: Uint8Array): Promise<void> {
    const level = sampleEntropy(data) > INCOMPRESSIBLE_BITS ? 0 : STREAM_DEFLATE_LEVEL;
    this.jobs.push({ grain, data: deflateAsync(data, { level }) });
    while (this.jobs.length > IN_FLIGHT) await this.emitOldest();
  }

  private async emitOldest(): Promise<void> {
    const job = this.jobs.shift()!;
    const z = await job.data;
    const gtIndex = Math.floor(job.grain / GTES_PER_GT);
    if (gtIndex !== this.gtIndex) {
      await this.endTable();
      this.gtIndex = gtIndex;
    }
    if (this.pos / SECTOR >= MAX_SPARSE_FILE_SECTORS) {
      throw new UsageError(`${this.file.path}: the stream has reached 2 TiB, the most its 32-bit grain table entries address; export this disk as vmfs or monolithicFlat`);
    }
    const record = new Uint8Array(ceilDiv(GRAIN_MARKER_SIZE + z.length, SECTOR) * SECTOR);
    writeGrainMarker(record, job.grain * this.header.grainSize, z.length);
    record.set(z, GRAIN_MARKER_SIZE);
    this.gt[job.grain - gtIndex * GTES_PER_GT] = this.pos / SECTOR;
    await this.append(record);
  }

  /** Writes the current GT (if it holds any grain) after its grains, and records it in the GD. */
  private async endTable(): Promise<void> {
    if (isZero(new Uint8Array(this.gt.buffer))) return;
    await this.append(metadataMarker(MARKER_GT, tableSectors(GTES_PER_GT)));
    this.gd[this.gtIndex] = this.pos / SECTOR;
    await this.append(serializeTable(this.gt));
    this.gt.fill(0);
  }

  private async append(buf: Uint8Array): Promise<void> {
    this.out.push(buf);
    this.outBytes += buf.length;
    this.pos += buf.length;
    if (this.outBytes >= OUT_CHUNK) await this.writeOut();
  }

  private async writeOut(): Promise<void> {
    if (this.outBytes === 0) return;
    const buf = this.out.length === 1 ? this.out[0]! : Buffer.concat(this.out);
    const at = this.outStart;
    this.out = [];
    this.outStart += this.outBytes;
    this.outBytes = 0;
    await this.file.write(buf, at);
  }

  private async drain(): Promise<void> {
    while (this.jobs.length > 0) await this.emitOldest();
    await this.writeOut();
  }

  /** Reads back what was written so far (grains still in memory included). */
  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the disk size ${this.size}`);
    }
    return this.serial(async () => {
      await this.drain();
      const gb = this.grainBytes;
      const tables = new Map<number, Uint32Array>();
      let done = 0;
      while (done < into.length) {
        const pos = at + done;
        const grain = Math.floor(pos / gb);
        const inGrain = pos - grain * gb;
        const n = Math.min(gb - inGrain, into.length - done);
        const dst = into.subarray(done, done + n);
        const sector = await this.entry(grain, tables);
        if (this.partial?.grain === grain) dst.set(this.partial.buf.subarray(inGrain, inGrain + n));
        else if (sector === 0) dst.fill(0);
        else {
          const plain = await inflateGrainAt(this.file, this.file.path, this.pos, sector, grain, gb, true);
          if (plain.length < inGrain + n) throw new CorruptImageError(`${this.file.path}: grain ${grain} reads back short (${plain.length} bytes)`);
          dst.set(plain.subarray(inGrain, inGrain + n));
        }
        done += n;
      }
    });
  }

  private async entry(grain: number, tables: Map<number, Uint32Array>): Promise<number> {
    const index = Math.floor(grain / GTES_PER_GT);
    if (index === this.gtIndex) return this.gt[grain - index * GTES_PER_GT]!;
    if (index > this.gtIndex || this.gd[index] === 0) return 0;
    let t = tables.get(index);
    if (!t) {
      t = await readTable(this.file, this.gd[index]!, GTES_PER_GT, this.pos, `${this.file.path}: grain table ${index}`);
      tables.set(index, t);
    }
    return t[grain - index * GTES_PER_GT]!;
  }

  /** Makes the grains written so far durable; the stream is readable by others only after close(). */
  flush(): Promise<void> {
    return this.serial(async () => {
      await this.drain();
      await this.file.flush();
    });
  }

  /** Finishes the stream: last grain and table, GD, footer, end-of-stream; syncs and closes. */
  async close(): Promise<void> {
    await this.serial(async () => {
      if (this.partial) await this.submitPartial();
      await this.drain();
      await this.endTable();
      const gdSectors = tableSectors(this.gd.length);
      await this.append(metadataMarker(MARKER_GD, gdSectors));
      const gdOffset = this.pos / SECTOR;
      await this.append(serializeTable(this.gd));
      await this.append(metadataMarker(MARKER_FOOTER, 1));
      await this.append(serializeSparseHeader({ ...this.header, gdOffset, gdAtEnd: false }));
      // the end-of-stream marker is an all-zero sector
      await this.append(new Uint8Array(SECTOR));
      await this.writeOut();
      await this.file.truncate(this.pos);
      await this.file.flush();
    });
    this.state = 'closed';
    await this.file.close();
  }

  async abort(): Promise<void> {
    this.state = 'closed';
    await this.queue.catch(() => {});
    // let compressions in flight finish before the file goes away
    await Promise.allSettled(this.jobs.map((j) => j.data));
    await this.file.close();
  }
}
