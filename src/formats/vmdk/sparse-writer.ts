/**
 * Writing a monolithicSparse VMDK: creating one, and growing an existing one in place.
 *
 * Every grain table is preallocated at creation (as qemu does), so growth only appends
 * grains at the end of the file and changes table entries. Following the DiskWriter
 * contract, a new grain's data goes to the file at once while its entries (in the grain
 * table and in the redundant one) wait in memory until flush(): sync, write the changed
 * table sectors, sync. A killed writer leaves tables pointing only at grains that arrived;
 * the orphan grains past them are harmless and new ones go after them.
 *
 * Speed: one file write per contiguous run of new grains (all new grains of one write()
 * are adjacent at the end of the file), all-zero grains never stored, no flush per grain.
 */
import { randomBytes } from 'node:crypto';
import { SECTOR, ceilDiv } from '../bytes.js';
import type { CreateOptions, DiskWriter } from '../disk-image.js';
import { CorruptImageError, UnsupportedVersionError, UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  COMPRESSION_NONE,
  FLAG_NEWLINE_TEST,
  FLAG_REDUNDANT_GD,
  MAX_SPARSE_FILE_SECTORS,
  baseName,
  cidValueOffset,
  isZero,
  newDescriptor,
  parseDescriptor,
  serializeDescriptor,
  serializeSparseHeader,
  serializeTable,
  sparseLayout,
  type SparseHeader,
} from './codec.js';
import { SparseExtent } from './sparse-extent.js';
import { refuseDelta } from './image.js';

/** Room for the embedded descriptor, as qemu leaves: qemu rewrites all 20 sectors when it changes the CID. */
export const DESCRIPTOR_SECTORS = 20;
const ENTRIES_PER_SECTOR = SECTOR / 4;
/** Above this, new grains of one write go to the file in pieces rather than as one copied buffer. */
const MAX_CONCAT_BYTES = 16 * 1024 * 1024;

/** Checks CreateOptions.blockSize as a grain size: a power of two from 512 B to 1 MiB. */
export function grainSectorsFrom(blockSize: number | undefined): number {
  const bytes = blockSize ?? 64 * 1024;
  const sectors = bytes / SECTOR;
  if (!Number.isInteger(sectors) || sectors < 1 || sectors > 2048 || !Number.isInteger(Math.log2(sectors))) {
    throw new UsageError(`a VMDK grain must be a power of two from 512 bytes to 1 MiB; ${bytes} bytes is not (VMware uses 65536)`);
  }
  return sectors;
}

export async function createSparse(file: RandomAccessFile, options: CreateOptions): Promise<SparseWriter> {
  const capacity = options.size / SECTOR;
  const grainSize = grainSectorsFrom(options.blockSize);
  const layout = sparseLayout(capacity, grainSize, 512, DESCRIPTOR_SECTORS);
  if (capacity > MAX_SPARSE_FILE_SECTORS || layout.overHead >= MAX_SPARSE_FILE_SECTORS) {
    throw new UsageError(
      `a monolithicSparse VMDK holds at most 2 TiB (its grain tables address 2^32 sectors); ${options.size} bytes is more: use the vmfs or monolithicFlat subformat`,
    );
  }
  const header: SparseHeader = {
    version: 1,
    flags: FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD,
    capacity,
    grainSize,
    descriptorOffset: 1,
    descriptorSize: DESCRIPTOR_SECTORS,
    numGTEsPerGT: 512,
    rgdOffset: layout.rgdOffset,
    gdOffset: layout.gdOffset,
    gdAtEnd: false,
    overHead: layout.overHead,
    uncleanShutdown: false,
    newlineBytesIntact: true,
    compressAlgorithm: COMPRESSION_NONE,
  };
  const descriptor = newDescriptor({
    createType: 'monolithicSparse',
    sectors: capacity,
    extentType: 'SPARSE',
    access: 'RW',
    fileName: baseName(options.finalName),
    random: randomBytes(36),
  });
  const text = Buffer.from(serializeDescriptor(descriptor), 'utf8');
  if (text.length > DESCRIPTOR_SECTORS * SECTOR) {
    throw new UsageError(`the file name "${options.finalName}" makes the VMDK descriptor longer than its ${DESCRIPTOR_SECTORS * SECTOR} bytes; choose a shorter name`);
  }
  const head = new Uint8Array((layout.rgdOffset + layout.gdSectors) * SECTOR);
  head.set(serializeSparseHeader(header), 0);
  head.set(text, SECTOR);
  const rgd = Array.from({ length: layout.gdEntries }, (_, i) => layout.firstRgt + i * layout.gtSectors);
  head.set(serializeTable(rgd), layout.rgdOffset * SECTOR);
  const gd = Array.from({ length: layout.gdEntries }, (_, i) => layout.firstGt + i * layout.gtSectors);
  await file.write(head, 0);
  await file.write(serializeTable(gd), layout.gdOffset * SECTOR);
  // the grain tables stay holes of zeros, so even a 2 TiB disk's 256 MiB of tables costs no space
  await file.truncate(layout.overHead * SECTOR);
  const extent = await SparseExtent.open(file, file.path, { tablesKnownEmpty: true });
  return new SparseWriter(file, extent, 'monolithicSparse', null);
}

export async function openSparseWritable(file: RandomAccessFile): Promise<SparseWriter> {
  const extent = await SparseExtent.open(file, file.path);
  const h = extent.header;
  if (extent.compressed || extent.fileHeader.gdAtEnd) {
    throw new UsageError(
      `${file.path} is a streamOptimized VMDK, which is written once from start to end and cannot grow in place; keep a monolithicSparse, vmfs or other working copy and export it to streamOptimized when needed`,
    );
  }
  if (h.version === 3) {
    throw new UnsupportedVersionError(
      `${file.path} is a version 3 sparse VMDK (VMware changed-block tracking), which qemu and we open read-only; convert it (qemu-img convert -O vmdk) to get a disk that can grow`,
    );
  }
  let cid: CidField | null = null;
  if (extent.descriptorText !== null) {
    try {
      const d = parseDescriptor(extent.descriptorText, file.path);
      refuseDelta(d, file.path);
    } catch (e) {
      if (e instanceof UnsupportedVersionError) throw e;
    }
    cid = cidField(extent.descriptorText);
    if (cid) cid.at += extent.fileHeader.descriptorOffset * SECTOR;
  }
  for (let i = 0; i < extent.gd.length; i++) {
    if (extent.isEmptyEntry(extent.gd[i]!)) {
      throw new UnsupportedVersionError(
        `${file.path}: grain table ${i} is not preallocated (its directory entry is ${extent.gd[i]}); we grow only sparse VMDKs whose grain tables are all preallocated, as qemu and VMware write them; convert it with qemu-img convert -O vmdk first`,
      );
    }
    if (extent.rgd && extent.isEmptyEntry(extent.rgd[i]!)) {
      throw new CorruptImageError(`${file.path}: the redundant grain directory has no table for entry ${i} while the primary one has; the file is damaged (qemu-img check, then restore it from another copy)`);
    }
  }
  return new SparseWriter(file, extent, 'monolithicSparse', cid);
}

/** Where the CID's hex digits are in descriptor text (bytes) and how many there are; null when there is no CID to patch. */
export function cidField(text: string): CidField | null {
  const at = cidValueOffset(text);
  if (at < 0) return null;
  const m = /^[0-9a-fA-F]{1,8}(?![0-9a-fA-F])/.exec(text.slice(at));
  return m ? { at: Buffer.byteLength(text.slice(0, at), 'utf8'), digits: m[0].length } : null;
}

export interface CidField {
  at: number;
  digits: number;
}

/**
 * A fresh random CID of the same number of hex digits as the old one (qemu writes it
 * without leading zeros), so it is patched in place by one small write that cannot tear
 * the descriptor. Never ffffffff (no parent) or fffffffe.
 */
export function newCidBytes(digits: number): Uint8Array {
  const max = 16 ** digits;
  let v = randomBytes(4).readUInt32BE(0) % max;
  if (v < 16 ** (digits - 1)) v += 16 ** (digits - 1);
  let hex = v.toString(16);
  if (hex === 'ffffffff' || hex === 'fffffffe') hex = '7fffffff';
  return Buffer.from(hex, 'latin1');
}

interface NewGrain {
  grain: number;
  data: Uint8Array;
}

export class SparseWriter implements DiskWriter {
  readonly format = 'vmdk';
  readonly size: number;
  private readonly grainBytes: number;
  private nextSector: number;
  /** GD index → [first, end) entries changed since the last flush. */
  private readonly dirty = new Map<number, [number, number]>();
  private dataWritten = false;
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(
    private readonly file: RandomAccessFile,
    private readonly extent: SparseExtent,
    readonly subformat: string,
    /** Where the descriptor's CID is in the file: VMware changes the CID when content changes (null: a new disk, or no CID to patch). */
    private cid: CidField | null,
  ) {
    this.size = extent.sizeBytes;
    this.grainBytes = extent.grainBytes;
    const h = extent.header;
    // qemu places new grains at the file's end rounded up to a grain
    this.nextSector = Math.max(h.overHead, ceilDiv(ceilDiv(extent.fileSize, SECTOR), h.grainSize) * h.grainSize);
  }

  /**
   * Runs operations one at a time, in call order. A caller that starts its next read while
   * our write() is pending (as export does) overlaps the two without any copy here.
   */
  private serial<T>(op: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new UsageError(`${this.file.path}: the VMDK writer is closed`));
    const p = this.queue.then(op);
    this.queue = p.catch(() => {});
    return p;
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    checkWrite(from, at, this.size, this.file.path);
    return this.serial(() => this.doWrite(from, at));
  }

  private async doWrite(from: Uint8Array, at: number): Promise<void> {
    const gb = this.grainBytes;
    const fresh: NewGrain[] = [];
    let placeFile = -1;
    let placeSrc = 0;
    let placeLen = 0;
    const inPlace: Promise<void>[] = [];
    const endPlace = () => {
      if (placeLen > 0) inPlace.push(this.file.write(from.subarray(placeSrc, placeSrc + placeLen), placeFile));
      placeLen = 0;
    };
    let done = 0;
    while (done < from.length) {
      const pos = at + done;
      const grain = Math.floor(pos / gb);
      const inGrain = pos - grain * gb;
      const n = Math.min(gb - inGrain, from.length - done);
      const part = from.subarray(done, done + n);
      const gte = await this.extent.entry(grain);
      if (!this.extent.isEmptyEntry(gte)) {
        const off = gte * SECTOR + inGrain;
        if (placeLen > 0 && placeFile + placeLen === off && placeSrc + placeLen === done) placeLen += n;
        else {
          endPlace();
          placeFile = off;
          placeSrc = done;
          placeLen = n;
        }
      } else if (!isZero(part)) {
        // an unallocated grain reads as zeros, so zeros written there need no grain
        let data = part;
        if (n < gb) {
          data = new Uint8Array(gb);
          data.set(part, inGrain);
        }
        fresh.push({ grain, data });
      }
      done += n;
    }
    endPlace();
    await Promise.all(inPlace);
    if (inPlace.length > 0) this.dataWritten = true;
    if (fresh.length > 0) await this.appendGrains(fresh);
  }

  /** Appends grains as one contiguous run at the end of the file, then points their entries at them (in memory). */
  private async appendGrains(grains: NewGrain[]): Promise<void> {
    const gs = this.extent.header.grainSize;
    const first = this.nextSector;
    if (first + grains.length * gs > MAX_SPARSE_FILE_SECTORS) {
      throw new UsageError(
        `${this.file.path}: storing ${grains.length} more grains would take the file past 2 TiB, the most a sparse VMDK's 32-bit grain table entries address; use the vmfs or monolithicFlat subformat for this disk`,
      );
    }
    // adjacent full grains are one piece of the caller's buffer: write it without copying
    const segments: Uint8Array[] = [];
    for (const g of grains) {
      const last = segments[segments.length - 1];
      if (last && last.buffer === g.data.buffer && last.byteOffset + last.length === g.data.byteOffset) {
        segments[segments.length - 1] = new Uint8Array(last.buffer, last.byteOffset, last.length + g.data.length);
      } else segments.push(g.data);
    }
    const total = grains.length * this.grainBytes;
    if (segments.length === 1) await this.file.write(segments[0]!, first * SECTOR);
    else if (total <= MAX_CONCAT_BYTES) await this.file.write(Buffer.concat(segments), first * SECTOR);
    else {
      let off = first * SECTOR;
      for (const s of segments) {
        await this.file.write(s, off);
        off += s.length;
      }
    }
    this.nextSector = first + grains.length * gs;
    this.extent.fileSize = Math.max(this.extent.fileSize, this.nextSector * SECTOR);
    this.dataWritten = true;
    const n = this.extent.header.numGTEsPerGT;
    let sector = first;
    for (const g of grains) {
      const gdIndex = Math.floor(g.grain / n);
      const t = await this.extent.table(gdIndex);
      if (!t) throw new Error(`grain table ${gdIndex} vanished`); // openSparseWritable refused absent tables
      const j = g.grain - gdIndex * n;
      t[j] = sector;
      this.extent.pin(gdIndex);
      const r = this.dirty.get(gdIndex);
      if (r) {
        r[0] = Math.min(r[0], j);
        r[1] = Math.max(r[1], j + 1);
      } else this.dirty.set(gdIndex, [j, j + 1]);
      sector += gs;
    }
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.serial(() => this.extent.read(into, at));
  }

  flush(): Promise<void> {
    return this.serial(() => this.doFlush());
  }

  private async doFlush(): Promise<void> {
    if (!this.dataWritten && this.dirty.size === 0) return;
    // the data the new entries point at must be durable before any entry is
    await this.file.flush();
    const n = this.extent.header.numGTEsPerGT;
    for (const [index, [lo, hi]] of [...this.dirty].sort((a, b) => a[0] - b[0])) {
      const t = (await this.extent.table(index))!;
      // whole sectors of the table, so each one lands in a single write
      const from = Math.floor(lo / ENTRIES_PER_SECTOR) * ENTRIES_PER_SECTOR;
      const to = Math.min(n, ceilDiv(hi, ENTRIES_PER_SECTOR) * ENTRIES_PER_SECTOR);
      const bytes = serializeTable(t, from, to).subarray(0, (to - from) * 4);
      await this.file.write(bytes, this.extent.gd[index]! * SECTOR + from * 4);
      if (this.extent.rgd) await this.file.write(bytes, this.extent.rgd[index]! * SECTOR + from * 4);
    }
    if (this.cid) {
      await this.file.write(newCidBytes(this.cid.digits), this.cid.at);
      this.cid = null;
    }
    await this.file.flush();
    this.dirty.clear();
    this.extent.unpinAll();
    this.dataWritten = false;
  }

  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      this.closed = true;
      await this.queue.catch(() => {});
      await this.file.close();
    }
  }

  async abort(): Promise<void> {
    this.closed = true;
    await this.queue.catch(() => {});
    await this.file.close();
  }
}

/** The DiskWriter argument rules: sector-aligned, inside the disk. */
export function checkWrite(from: Uint8Array, at: number, size: number, path: string): void {
  if (at % SECTOR !== 0 || from.length % SECTOR !== 0 || at < 0) {
    throw new UsageError(`${path}: writes take offsets and lengths that are multiples of 512; got ${from.length} bytes at ${at}`);
  }
  if (at + from.length > size) {
    throw new UsageError(`${path}: a write of ${from.length} bytes at ${at} passes the disk's end at ${size}`);
  }
}
