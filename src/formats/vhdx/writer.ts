/**
 * Writing VHDX: creating a dynamic (or fixed) disk, and growing an existing one in place.
 *
 * Layout of a new disk, Hyper-V style, every structure 1 MiB-aligned: header section (1 MiB),
 * log at 1 MiB (1 MiB, LogGuid zero: we never write the log), metadata at 2 MiB (1 MiB), BAT at
 * 3 MiB (its entries rounded up to 1 MiB), payload blocks after it. Region table entries are
 * marked Required, as Hyper-V writes them. Logical sectors are 512 bytes (qemu reads no
 * other), physical 4096.
 *
 * A write into a block that is not present allocates the block at the end of the file: the
 * file is extended with truncate (the block's unwritten part stays a sparse hole, never 32 MiB
 * of written zeros), the data goes there at once, and the BAT entry waits in memory until
 * flush (data sync, changed BAT sectors, sync), per the DiskWriter contract. Zeros never
 * allocate: an all-zero range of an absent block is skipped, at 64 KiB granularity. Writes into
 * present blocks go in place. Each call issues one file write per run that is contiguous both
 * in the caller's buffer and in the file, so an ascending export of 1-4 MiB writes costs one
 * write each.
 *
 * Once per session, before the first change, both headers are rewritten as qemu does: the
 * non-current slot gets SequenceNumber+1, a new FileWriteGuid and DataWriteGuid and a zero
 * LogGuid, is flushed, and the same is done again so that both slots hold the new values. A
 * file with a pending log first gets its log replayed into it (the in-memory replay written
 * out), so the zero LogGuid is true.
 */
import { randomUUID } from 'node:crypto';
import { SECTOR, alignUp, isAllZero } from '../bytes.js';
import type { CreateOptions, DiskWriter } from '../disk-image.js';
import { CorruptImageError, UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  HEADER_OFFSETS,
  MAX_BLOCK_SIZE,
  MAX_VIRTUAL_SIZE,
  MIN_BLOCK_SIZE,
  MiB,
  PAYLOAD_FULLY_PRESENT,
  REGION_BAT,
  REGION_METADATA,
  REGION_TABLE_OFFSETS,
  ZERO_GUID,
  guidFromString,
  isSectorBitmapIndex,
  payloadBatIndex,
  serializeFileIdentifier,
  serializeHeader,
  serializeMetadata,
  serializeRegionTable,
  setBatEntry,
  type VhdxHeader,
  type VhdxMetadata,
} from './codec.js';
import { BatTable, blockLocation, geometryOf, openStructures, readVirtual, type Geometry } from './image.js';
import { ReplayedFile } from './replay.js';

/** Hyper-V's default block size for dynamic disks. */
export const DEFAULT_BLOCK_SIZE = 32 * MiB;
/** Zero detection granularity inside a block being allocated: what stays a hole in the file. */
const ZERO_GRAIN = 64 * 1024;
/** Recently allocated blocks whose holes we remember (an ascending export needs one or two). */
const FRESH_BLOCKS = 64;
/** Largest single write when writing out a replayed zero range. */
const ZERO_CHUNK = 4 * MiB;
const CREATOR = 'imagekeep';

const LOG_OFFSET = MiB;
const LOG_LENGTH = MiB;
const METADATA_OFFSET = 2 * MiB;
const METADATA_LENGTH = MiB;
const BAT_OFFSET = 3 * MiB;

function newGuid(): Uint8Array {
  return guidFromString(randomUUID());
}

export class VhdxWriter implements DiskWriter {
  readonly format = 'vhdx' as const;
  readonly size: number;
  private dataDirty = false;
  private closed = false;
  /**
   * Recently allocated blocks, with a bit per 64 KiB grain already written: the other grains
   * are still holes, so zeros for them need no write (an export writes a block in several
   * calls, and its zero parts must not fill the holes). Least recently used first, at most
   * FRESH_BLOCKS: a block that falls out is simply written in place from then on.
   */
  private readonly fresh = new Map<number, Uint8Array>();
  /** A fixed disk this writer created: one bit per block already touched (the others are holes). */
  private readonly fixedTouched: Uint8Array | null;

  private constructor(
    private readonly file: RandomAccessFile,
    private readonly view: ReplayedFile,
    private readonly bat: BatTable,
    private readonly g: Geometry,
    readonly subformat: 'dynamic' | 'fixed',
    private header: VhdxHeader,
    private slot: 0 | 1,
    /** Headers already rewritten for this session (a new file starts with fresh ones). */
    private started: boolean,
    /** Where the next payload block goes: the 1 MiB-aligned end of the file. */
    private eof: number,
    /** Created by this writer: every block not written yet is a hole in the file. */
    private readonly created: boolean,
  ) {
    this.size = g.virtualSize;
    this.fixedTouched = created && subformat === 'fixed' ? new Uint8Array(Math.ceil(g.blockCount / 8)) : null;
  }

  /** The grain bitmap of a block whose unwritten grains are holes, if known. */
  private holes(block: number, present: boolean): Uint8Array | undefined {
    const bits = this.fresh.get(block);
    if (bits) {
      this.fresh.delete(block);
      this.fresh.set(block, bits);
      return bits;
    }
    const t = this.fixedTouched;
    if (!present || !t || (t[Math.floor(block / 8)] & (1 << (block % 8))) !== 0) return undefined;
    t[Math.floor(block / 8)] |= 1 << (block % 8);
    return this.remember(block);
  }

  private remember(block: number): Uint8Array {
    const bits = new Uint8Array(this.g.blockSize / ZERO_GRAIN / 8);
    this.fresh.set(block, bits);
    if (this.fresh.size > FRESH_BLOCKS) this.fresh.delete(this.fresh.keys().next().value as number);
    return bits;
  }

  /** Creates a new disk in `file` (made empty first). */
  static async create(file: RandomAccessFile, options: CreateOptions): Promise<VhdxWriter> {
    const { size } = options;
    const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
    const subformat = options.subformat ?? 'dynamic';
    if (!Number.isSafeInteger(size) || size <= 0 || size % SECTOR !== 0 || size > MAX_VIRTUAL_SIZE) {
      throw new UsageError(`a VHDX disk size must be a positive multiple of 512 bytes up to 64 TiB (${MAX_VIRTUAL_SIZE}); got ${size}`, { size });
    }
    if (!Number.isInteger(Math.log2(blockSize)) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE) {
      throw new UsageError(`a VHDX block size must be a power of two from 1 MiB to 256 MiB; got ${blockSize} bytes`, { blockSize });
    }
    if (subformat !== 'dynamic' && subformat !== 'fixed') {
      throw new UsageError(`VHDX disks are written as "dynamic" or "fixed"; "${subformat}" is not supported`, { subformat });
    }
    const metadata: VhdxMetadata = {
      blockSize,
      leaveBlocksAllocated: subformat === 'fixed',
      hasParent: false,
      virtualSize: size,
      page83: newGuid(),
      logicalSectorSize: 512,
      physicalSectorSize: 4096,
    };
    const g = geometryOf(metadata);
    const batLength = alignUp(g.batEntries * 8, MiB);
    const dataStart = BAT_OFFSET + batLength;
    const fileSize = subformat === 'fixed' ? dataStart + g.blockCount * blockSize : dataStart;

    if ((await file.size()) > 0) await file.truncate(0);
    await file.write(serializeFileIdentifier(CREATOR), 0);
    const fileWriteGuid = newGuid();
    const dataWriteGuid = newGuid();
    const header = (seq: bigint): VhdxHeader => ({
      sequenceNumber: seq,
      fileWriteGuid,
      dataWriteGuid,
      logGuid: ZERO_GUID,
      logVersion: 0,
      version: 1,
      logLength: LOG_LENGTH,
      logOffset: LOG_OFFSET,
    });
    await file.write(serializeHeader(header(1n)), HEADER_OFFSETS[0]);
    await file.write(serializeHeader(header(2n)), HEADER_OFFSETS[1]);
    const table = serializeRegionTable([
      { guid: REGION_BAT, fileOffset: BAT_OFFSET, length: batLength, required: true },
      { guid: REGION_METADATA, fileOffset: METADATA_OFFSET, length: METADATA_LENGTH, required: true },
    ]);
    await file.write(table, REGION_TABLE_OFFSETS[0]);
    await file.write(table, REGION_TABLE_OFFSETS[1]);
    await file.write(serializeMetadata(metadata), METADATA_OFFSET);
    if (subformat === 'fixed') {
      // Every block present, in order after the BAT; written a page at a time so a big BAT is never whole in memory.
      for (let start = 0; start < g.batBytes; start += BatTable.PAGE) {
        const page = Buffer.alloc(Math.min(BatTable.PAGE, g.batBytes - start));
        for (let index = start / 8; index < (start + page.length) / 8; index++) {
          if (isSectorBitmapIndex(index, g.chunkRatio)) continue;
          const block = index - Math.floor(index / (g.chunkRatio + 1));
          if (block >= g.blockCount) break;
          setBatEntry(page, index - start / 8, PAYLOAD_FULLY_PRESENT, dataStart + block * blockSize);
        }
        await file.write(page, BAT_OFFSET + start);
      }
    }
    // The BAT of a dynamic disk is all NOT_PRESENT (zero): the sparse extension holds it.
    await file.truncate(fileSize);
    await file.flush();
    const view = new ReplayedFile(file, fileSize);
    const bat = new BatTable(subformat === 'fixed' ? view : null, BAT_OFFSET, g.batBytes);
    return new VhdxWriter(file, view, bat, g, subformat, header(2n), 1, true, fileSize, true);
  }

  /** Opens an existing dynamic or fixed disk to grow it in place. Nothing is written until the first write. */
  static async openWritable(file: RandomAccessFile): Promise<VhdxWriter> {
    const s = await openStructures(file);
    const h = s.head.header;
    const end = Math.max(s.view.size, h.logOffset + h.logLength);
    const bat = new BatTable(s.view, s.regionState.regions.bat.fileOffset, s.geometry.batBytes);
    const subformat = s.metadata.leaveBlocksAllocated ? 'fixed' : 'dynamic';
    return new VhdxWriter(file, s.view, bat, s.geometry, subformat, h, s.head.slot, false, alignUp(end, MiB), false);
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    if (this.closed) throw new UsageError(`write to a VHDX writer that was closed (${this.file.path})`);
    if (!Number.isSafeInteger(at) || at < 0 || at % SECTOR !== 0 || from.length % SECTOR !== 0 || at + from.length > this.size) {
      throw new UsageError(
        `VHDX writes take 512-byte multiples inside the disk: ${from.length} bytes at ${at} do not fit a ${this.size}-byte disk in whole sectors`,
        { at, length: from.length, size: this.size },
      );
    }
    if (from.length === 0) return;
    await this.begin();
    const g = this.g;
    const runs: { file: number; src: number; length: number }[] = [];
    const push = (fileOffset: number, src: number, length: number) => {
      const last = runs[runs.length - 1];
      if (last && last.file + last.length === fileOffset && last.src + last.length === src) last.length += length;
      else runs.push({ file: fileOffset, src, length });
    };
    let pos = 0;
    while (pos < from.length) {
      const v = at + pos;
      const block = Math.floor(v / g.blockSize);
      const blockStart = block * g.blockSize;
      const n = Math.min(blockStart + g.blockSize - v, from.length - pos);
      const index = payloadBatIndex(block, g.chunkRatio);
      if (!this.bat.has(index)) await this.bat.load(index);
      let offset = blockLocation(this.bat, g, block, Math.max(this.view.size, this.eof));
      const fresh = this.holes(block, offset >= 0);
      if (offset >= 0 && !fresh) {
        push(offset + (v - blockStart), pos, n);
      } else {
        // A block that is absent, or whose unwritten grains are still holes in the file: zeros
        // for those grains need no write, and zeros alone never allocate a block.
        let bits = fresh;
        for (let s = pos; s < pos + n; ) {
          const e = Math.min(pos + n, s + ZERO_GRAIN - ((at + s) % ZERO_GRAIN));
          const grain = Math.floor((at + s - blockStart) / ZERO_GRAIN);
          const written = bits !== undefined && (bits[grain >> 3] & (1 << (grain & 7))) !== 0;
          if (written || !isAllZero(from.subarray(s, e))) {
            if (offset < 0) {
              offset = this.eof;
              this.eof += g.blockSize;
              this.bat.set(index, PAYLOAD_FULLY_PRESENT, offset);
              bits = this.remember(block);
            }
            if (bits) bits[grain >> 3] |= 1 << (grain & 7);
            push(offset + (at + s - blockStart), s, e - s);
          }
          s = e;
        }
      }
      pos += n;
    }
    if (this.eof > this.view.size) {
      await this.file.truncate(this.eof);
      this.view.grow(this.eof);
    }
    for (const r of runs) await this.file.write(from.subarray(r.src, r.src + r.length), r.file);
    if (runs.length > 0) this.dataDirty = true;
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return readVirtual(this.view, this.bat, this.g, into, at);
  }

  async flush(): Promise<void> {
    if (!this.dataDirty && !this.bat.changed) return;
    await this.file.flush();
    if (this.bat.changed) {
      await this.bat.writeChanged(this.file);
      await this.file.flush();
    }
    this.dataDirty = false;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.flush();
    this.closed = true;
    await this.file.close();
  }

  async abort(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.close();
  }

  /** Once per session, before the first change: replay a pending log into the file, then the header update. */
  private async begin(): Promise<void> {
    if (this.started) return;
    if (this.view.pending) {
      const zeros = new Uint8Array(ZERO_CHUNK);
      for (const w of this.view.replayWrites()) {
        for (let done = 0; done < w.length; done += ZERO_CHUNK) {
          const n = Math.min(w.length - done, ZERO_CHUNK);
          await this.file.write(w.data ? w.data.subarray(done, done + n) : zeros.subarray(0, n), w.offset + done);
        }
      }
      if (this.view.size > this.view.realSize) await this.file.truncate(this.view.size);
      await this.file.flush();
      this.view.materialize();
    }
    if (this.header.sequenceNumber >= 2n ** 64n - 2n) {
      throw new CorruptImageError(`the VHDX header sequence number ${this.header.sequenceNumber} is at the end of its 64-bit range; the file is damaged`);
    }
    const fileWriteGuid = newGuid();
    const dataWriteGuid = newGuid();
    for (let pass = 0; pass < 2; pass++) {
      const next: VhdxHeader = {
        ...this.header,
        sequenceNumber: this.header.sequenceNumber + 1n,
        fileWriteGuid,
        dataWriteGuid,
        logGuid: ZERO_GUID,
      };
      const slot = this.slot === 0 ? 1 : 0;
      await this.file.write(serializeHeader(next), HEADER_OFFSETS[slot]);
      await this.file.flush();
      this.header = next;
      this.slot = slot;
    }
    this.started = true;
  }
}
