/**
 * Writing a VHD: creating a fixed or dynamic disk, and growing an existing dynamic disk in
 * place (any 512-aligned range, any time, locally or over SFTP).
 *
 * What every consumer accepts (../shared/reference/formats.md §0, §1): creator "win " on
 * host "Wi2k", so that qemu sizes the disk by current_size and not by CHS; CHS computed as
 * the spec computes it; 2 MiB blocks; maxTableEntries = ceil(size / blockSize); the BAT
 * padded with 0xFF to a whole sector; an allocated block's bitmap all ones with its
 * unwritten sectors zero; both footer copies byte-identical.
 *
 * Growing, crash-safe (the DiskWriter contract): a new block goes where the trailing footer
 * was, bitmap and data in one write (one write per run of consecutive new blocks, which an
 * ascending export produces), and the file is extended by truncate so that the block's
 * unwritten sectors, and its all-zero 64 KiB stretches, are holes that read as zeros. Its BAT entry stays in memory; `flush`
 * syncs the data, writes the trailing footer at the new end and the dirty BAT sectors, and
 * syncs again. A killed writer so leaves a file whose BAT points only at data that arrived,
 * and whose trailing footer may be missing or sit before blocks nothing points at;
 * `openWritable` repairs that first (see `repairTail`). All-zero writes to blocks not yet
 * allocated allocate nothing.
 */
import { randomUUID } from 'node:crypto';
import { SECTOR, ceilDiv, isAllZero } from '../bytes.js';
import type { CreateOptions, DiskWriter } from '../disk-image.js';
import { UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  batBytes,
  bitmapBytes,
  chsGeometry,
  DEFAULT_BLOCK_SIZE,
  DISK_DYNAMIC,
  DISK_FIXED,
  encodeFooter,
  encodeHeader,
  FEATURE_RESERVED,
  FOOTER_SIZE,
  HEADER_SIZE,
  isPowerOfTwo,
  MAX_BLOCK_SIZE,
  MAX_VHD_SIZE,
  MIN_BLOCK_SIZE,
  UNALLOCATED,
  VERSION_1_0,
  vhdTimestamp,
  type VhdFooter,
} from './codec.js';
import { checkRange, readBlocks, type BlockMap } from './reader.js';
import { loadVhd, type VhdStructure } from './structure.js';

const MiB = 1024 * 1024;
/** Hyper-V's creator version for "win " (Windows Server 2008 R2 and later write 0x000A0000). */
const CREATOR_VERSION = 0x000a0000;
/** The BAT holds 32-bit sector numbers: no block may start at or beyond this sector. */
const LAST_BLOCK_SECTOR = UNALLOCATED - 1;
/** Largest buffer we fill when writing a new BAT (a 2040 GiB disk of 64 KiB blocks has a 128 MiB BAT). */
const BAT_CHUNK = 4 * MiB;
/** Granularity of the zero scan of a new block's data: all-zero stretches of this size stay holes. */
const ZERO_SCAN = 64 * 1024;

function checkWrite(from: Uint8Array, at: number, size: number): void {
  if (at % SECTOR !== 0 || from.length % SECTOR !== 0) {
    throw new RangeError(`VHD writes take whole 512-byte sectors; got ${from.length} bytes at ${at}`);
  }
  checkRange('write', from.length, at, size);
}

/** Runs operations one at a time, in call order; after a failure, every later call fails too. */
class Serial {
  private tail: Promise<unknown> = Promise.resolve();
  private failure: unknown = null;

  run<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(async () => {
      if (this.failure !== null) {
        const why = this.failure instanceof Error ? this.failure.message : String(this.failure);
        throw new UsageError(`the VHD writer stopped after an earlier failure (${why}); abort it and start again`);
      }
      try {
        return await fn();
      } catch (e) {
        this.failure = e;
        throw e;
      }
    });
    this.tail = next.catch(() => {});
    return next;
  }
}

export function validateCreateOptions(options: CreateOptions): { subformat: 'fixed' | 'dynamic'; blockSize: number } {
  const { size } = options;
  const subformat = options.subformat ?? (options.azure ? 'fixed' : 'dynamic');
  if (subformat !== 'fixed' && subformat !== 'dynamic') {
    throw new UsageError(
      subformat === 'differencing'
        ? `imagekeep reads differencing VHDs but does not create them; choose fixed or dynamic`
        : `"${subformat}" is not a VHD sub-format imagekeep writes; choose fixed or dynamic`,
    );
  }
  if (!Number.isSafeInteger(size) || size <= 0 || size % SECTOR !== 0) {
    throw new UsageError(`a VHD's size must be a positive multiple of 512 bytes; ${size} is not`);
  }
  if (size > MAX_VHD_SIZE) {
    throw new UsageError(
      `a VHD holds at most 2040 GiB (${MAX_VHD_SIZE} bytes) and ${size} bytes were asked for; use VHDX for larger disks`,
    );
  }
  if (options.azure) {
    if (subformat !== 'fixed') throw new UsageError(`Azure takes only fixed VHDs; asked for a ${subformat} one`);
    if (size % MiB !== 0) {
      throw new UsageError(
        `Azure needs a VHD whose size is a whole number of MiB; ${size} bytes is ${size % MiB} bytes past ${Math.floor(size / MiB)} MiB: round it up to ${ceilDiv(size, MiB) * MiB}`,
      );
    }
  }
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (subformat === 'dynamic') {
    if (!isPowerOfTwo(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE) {
      throw new UsageError(`a VHD block size must be a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE} bytes; ${blockSize} is not`);
    }
    const blocks = ceilDiv(size, blockSize);
    const lastStart = dynamicFirstBlock(blocks) + (blocks - 1) * (bitmapBytes(blockSize) + blockSize);
    if (lastStart / SECTOR > LAST_BLOCK_SECTOR) {
      throw new UsageError(
        `with ${blockSize}-byte blocks a full ${size}-byte VHD would place blocks past the 2 TiB its 32-bit BAT entries reach; use 2 MiB blocks`,
      );
    }
  }
  return { subformat, blockSize };
}

/** Where a new dynamic disk's first block goes: after the footer copy, the header and the BAT. */
function dynamicFirstBlock(blocks: number): number {
  return FOOTER_SIZE + HEADER_SIZE + batBytes(blocks);
}

function newFooter(size: number, diskType: number, time: number): VhdFooter {
  return {
    features: FEATURE_RESERVED,
    formatVersion: VERSION_1_0,
    dataOffset: diskType === DISK_FIXED ? null : FOOTER_SIZE,
    timestamp: vhdTimestamp(time),
    creatorApp: 'win ',
    creatorVersion: CREATOR_VERSION,
    creatorHostOs: 'Wi2k',
    originalSize: size,
    currentSize: size,
    geometry: chsGeometry(size),
    diskType,
    checksum: 0,
    uniqueId: Buffer.from(randomUUID().replace(/-/g, ''), 'hex'),
    savedState: 0,
  };
}

/** Creates a fixed or dynamic VHD in an empty file. */
export async function createVhd(file: RandomAccessFile, options: CreateOptions): Promise<DiskWriter> {
  const { subformat, blockSize } = validateCreateOptions(options);
  const { size } = options;
  const time = options.time ?? Date.now() / 1000;
  if (subformat === 'fixed') {
    const footer = encodeFooter(newFooter(size, DISK_FIXED, time));
    await file.truncate(size);
    await file.write(footer, size);
    return new FixedWriter(file, size, 0);
  }
  const footer = encodeFooter(newFooter(size, DISK_DYNAMIC, time));
  const blocks = ceilDiv(size, blockSize);
  const tableOffset = FOOTER_SIZE + HEADER_SIZE;
  const header = encodeHeader({
    dataOffset: null,
    tableOffset,
    headerVersion: VERSION_1_0,
    maxTableEntries: blocks,
    blockSize,
    checksum: 0,
    parentUniqueId: new Uint8Array(16),
    parentTimestamp: 0,
    parentName: '',
    locators: [],
  });
  await file.truncate(0);
  await file.write(Buffer.concat([footer, header]), 0);
  const table = batBytes(blocks);
  const ff = Buffer.alloc(Math.min(table, BAT_CHUNK), 0xff);
  for (let at = 0; at < table; at += ff.length) await file.write(ff.subarray(0, Math.min(ff.length, table - at)), tableOffset + at);
  const dataEnd = tableOffset + table;
  await file.write(footer, dataEnd);
  await file.flush();
  return new DynamicWriter(file, {
    size,
    blockSize,
    tableOffset,
    bat: Buffer.alloc(batBytes(blocks), 0xff),
    footer,
    dataEnd,
  });
}

/**
 * Opens an existing VHD for writing: a fixed disk in place, a dynamic one to grow, after
 * repairing what an interrupted writer leaves. Differencing disks are read-only here.
 */
export async function openVhdWritable(file: RandomAccessFile): Promise<DiskWriter> {
  const s = await loadVhd(file);
  if (s.subformat === 'fixed') return new FixedWriter(file, s.size, s.size);
  if (s.subformat === 'differencing') {
    throw new UsageError(`${file.path} is a differencing VHD; imagekeep reads those but does not write into them`);
  }
  await repairTail(file, s);
  const h = s.header!;
  // Only the BAT sectors that cover the disk are held and rewritten; entries past the
  // disk's end in a larger table (older writers rounded it up) are left as they are.
  const bat = Buffer.alloc(batBytes(s.blockCount));
  await file.read(bat, h.tableOffset);
  return new DynamicWriter(file, {
    size: s.size,
    blockSize: s.blockSize,
    tableOffset: h.tableOffset,
    bat,
    footer: s.footerBytes,
    dataEnd: s.dataEnd,
  });
}

/**
 * Puts the trailing footer right after the last block the BAT points at, and the copy at 0
 * back if it was the damaged one.
 *
 * After a crash the file may hold, past the last block the BAT points at, blocks whose BAT
 * entries never reached the disk (their data was written, the flush that would have
 * published them was not). We cut them off and put the footer where they began, so that
 * their space is used again: nothing refers to them, they hold only writes the writer
 * never reported durable, and a new block must start over fresh holes anyway (its
 * unwritten sectors have to read as zeros, which stale bytes would not). The other choice,
 * a footer after them, would leak their space for ever and leave the file looking grown
 * for nothing. A crash during the repair leaves the same situation, repaired next time.
 */
async function repairTail(file: RandomAccessFile, s: VhdStructure): Promise<void> {
  let changed = false;
  if (s.footerSource === 'tail') {
    await file.write(s.footerBytes, 0);
    changed = true;
  }
  if (!s.trailingSound) {
    if (s.fileSize !== s.dataEnd) await file.truncate(s.dataEnd);
    await file.write(s.footerBytes, s.dataEnd);
    changed = true;
  }
  if (changed) await file.flush();
}

class FixedWriter implements DiskWriter {
  readonly format = 'vhd';
  readonly subformat = 'fixed';
  private readonly serial = new Serial();

  /**
   * @param unwrittenFrom bytes at and past this offset were never written since the file
   *   was created sparse, so all-zero writes there are skipped (an ascending export's
   *   holes stay holes); `size` for an existing disk.
   */
  constructor(private readonly file: RandomAccessFile, readonly size: number, private unwrittenFrom: number) {}

  async write(from: Uint8Array, at: number): Promise<void> {
    checkWrite(from, at, this.size);
    return this.serial.run(async () => {
      if (at >= this.unwrittenFrom && isAllZero(from)) return;
      await this.file.write(from, at);
      this.unwrittenFrom = Math.max(this.unwrittenFrom, at + from.length);
    });
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    checkRange('read', into.length, at, this.size);
    return this.serial.run(() => this.file.read(into, at));
  }

  flush(): Promise<void> {
    return this.serial.run(() => this.file.flush());
  }

  async close(): Promise<void> {
    await this.flush();
    await this.file.close();
  }

  async abort(): Promise<void> {
    await this.file.close();
  }
}

interface DynamicState {
  size: number;
  blockSize: number;
  tableOffset: number;
  /** The BAT sectors covering the disk, as they are in the file. */
  bat: Buffer;
  /** The footer, byte for byte, for the trailing copy. */
  footer: Buffer;
  /** End of the last block: where the next block, and meanwhile the trailing footer, go. */
  dataEnd: number;
}

class DynamicWriter implements DiskWriter, BlockMap {
  readonly format = 'vhd';
  readonly subformat = 'dynamic';
  readonly size: number;
  readonly blockSize: number;
  readonly bitmapSize: number;
  private readonly tableOffset: number;
  private readonly bat: Buffer;
  private readonly footer: Buffer;
  private readonly fullBitmap: Buffer;
  /** Where the next new block goes; the trailing footer belongs here. */
  private nextFree: number;
  /** The file's length as our writes have left it. */
  private fileEnd: number;
  private footerInPlace = true;
  /** BAT sectors (indexes into `bat` / 512) with entries not yet in the file. */
  private readonly dirty = new Set<number>();
  private readonly serial = new Serial();
  private scratch = Buffer.alloc(0);

  constructor(private readonly file: RandomAccessFile, st: DynamicState) {
    this.size = st.size;
    this.blockSize = st.blockSize;
    this.bitmapSize = bitmapBytes(st.blockSize);
    this.tableOffset = st.tableOffset;
    this.bat = st.bat;
    this.footer = st.footer;
    this.fullBitmap = Buffer.alloc(this.bitmapSize, 0xff);
    this.nextFree = st.dataEnd;
    this.fileEnd = st.dataEnd + FOOTER_SIZE;
  }

  blockStart(i: number): number | null {
    const e = this.bat.readUInt32BE(i * 4);
    return e === UNALLOCATED ? null : e * SECTOR;
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    checkWrite(from, at, this.size);
    return this.serial.run(() => this.writeNow(from, at));
  }

  private allocate(block: number): number {
    const start = this.nextFree;
    if (start / SECTOR > LAST_BLOCK_SECTOR) {
      throw new UsageError(`${this.file.path}: a new block at offset ${start} would pass the 2 TiB a VHD's 32-bit BAT entries reach`);
    }
    this.bat.writeUInt32BE(start / SECTOR, block * 4);
    this.dirty.add(Math.floor((block * 4) / SECTOR));
    this.nextFree += this.bitmapSize + this.blockSize;
    this.footerInPlace = false;
    return start;
  }

  private async writeNow(from: Uint8Array, at: number): Promise<void> {
    const bs = this.blockSize;
    // Pieces that lie back to back in the file, written with one call: an ascending export
    // of new blocks becomes one write per call (bitmap, data, bitmap, data, ...).
    let runAt = 0;
    let runBytes = 0;
    let pieces: Uint8Array[] = [];
    const writeRun = async () => {
      if (pieces.length === 0) return;
      await this.file.write(pieces.length === 1 ? pieces[0]! : this.gather(pieces, runBytes), runAt);
      this.fileEnd = Math.max(this.fileEnd, runAt + runBytes);
      pieces = [];
      runBytes = 0;
    };
    const append = async (fileOffset: number, bytes: Uint8Array) => {
      if (pieces.length > 0 && fileOffset !== runAt + runBytes) await writeRun();
      if (pieces.length === 0) runAt = fileOffset;
      pieces.push(bytes);
      runBytes += bytes.length;
    };
    let done = 0;
    while (done < from.length) {
      const pos = at + done;
      const block = Math.floor(pos / bs);
      const inBlock = pos - block * bs;
      const n = Math.min(bs - inBlock, from.length - done);
      const seg = from.subarray(done, done + n);
      done += n;
      const start = this.blockStart(block);
      if (start !== null) {
        await append(start + this.bitmapSize + inBlock, seg);
        continue;
      }
      // A new block lands on fresh holes, so its all-zero stretches need not be written;
      // a block that is all zeros is not allocated at all.
      const nonZero: [number, number][] = [];
      for (let off = 0; off < n; off += ZERO_SCAN) {
        const end = Math.min(n, off + ZERO_SCAN);
        if (isAllZero(seg.subarray(off, end))) continue;
        const last = nonZero[nonZero.length - 1];
        if (last && last[1] === off) last[1] = end;
        else nonZero.push([off, end]);
      }
      if (nonZero.length === 0) continue;
      const fresh = this.allocate(block);
      await append(fresh, this.fullBitmap);
      for (const [a, b] of nonZero) await append(fresh + this.bitmapSize + inBlock + a, seg.subarray(a, b));
    }
    await writeRun();
    // New blocks end at nextFree; sectors nobody wrote become holes, not written zeros.
    if (this.fileEnd < this.nextFree) {
      await this.file.truncate(this.nextFree);
      this.fileEnd = this.nextFree;
    }
  }

  /**
   * The pieces copied into one reused buffer. A fresh Buffer.concat per call costs page
   * faults on new memory, about 0.35 s per GiB here; the reused one about a third of that.
   */
  private gather(pieces: Uint8Array[], total: number): Buffer {
    if (this.scratch.length < total) this.scratch = Buffer.allocUnsafe(Math.max(total, Math.min(2 * this.scratch.length, 64 * MiB)));
    let at = 0;
    for (const p of pieces) {
      this.scratch.set(p, at);
      at += p.length;
    }
    return this.scratch.subarray(0, total);
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    checkRange('read', into.length, at, this.size);
    return this.serial.run(() => readBlocks(this.file, this, into, at, null));
  }

  flush(): Promise<void> {
    return this.serial.run(() => this.flushNow());
  }

  private async flushNow(): Promise<void> {
    if (this.dirty.size === 0 && this.footerInPlace) {
      await this.file.flush();
      return;
    }
    // The blocks' data is durable before anything points at it.
    await this.file.flush();
    if (!this.footerInPlace) {
      await this.file.write(this.footer, this.nextFree);
      this.fileEnd = Math.max(this.fileEnd, this.nextFree + FOOTER_SIZE);
      this.footerInPlace = true;
    }
    const sectors = [...this.dirty].sort((a, b) => a - b);
    for (let i = 0; i < sectors.length; ) {
      let j = i + 1;
      while (j < sectors.length && sectors[j] === sectors[j - 1]! + 1) j++;
      const first = sectors[i]!;
      const count = j - i;
      await this.file.write(this.bat.subarray(first * SECTOR, (first + count) * SECTOR), this.tableOffset + first * SECTOR);
      i = j;
    }
    this.dirty.clear();
    await this.file.flush();
  }

  async close(): Promise<void> {
    await this.flush();
    await this.file.close();
  }

  async abort(): Promise<void> {
    await this.file.close();
  }
}
