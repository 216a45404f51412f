/**
 * Opening a VHDX file: the steps from the identifier to the BAT, each a function so that the
 * structure check can run them one by one and report what fails, and the disk view the
 * reader and the writer share (block lookup, reads, allocated ranges).
 *
 * Opening order follows MS-VHDX: identifier, both headers (current = valid with the higher
 * sequence number), then the log (replayed in memory, see replay.ts), and only then the region
 * table, the metadata and the BAT, which the log may have changed.
 * Every size that drives an allocation is bounded first: the log by 64 MiB and the file, the
 * metadata items by their fixed lengths, the BAT by its region, which lies inside the file.
 */
import { alignUp, ceilDiv } from '../bytes.js';
import { CorruptImageError, UnsupportedVersionError } from '../errors.js';
import type { ByteRange, RandomAccessFile } from '../types.js';
import {
  HEAD_READ_SIZE,
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  HEADER_SIZE,
  LOG_SECTOR,
  METADATA_TABLE_SIZE,
  MiB,
  PAYLOAD_FULLY_PRESENT,
  PAYLOAD_NOT_PRESENT,
  PAYLOAD_PARTIALLY_PRESENT,
  PAYLOAD_UNDEFINED,
  PAYLOAD_UNMAPPED,
  PAYLOAD_ZERO,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  batEntryCount,
  batFileOffset,
  batReservedBits,
  batState,
  checkHeaderVersion,
  chooseHeader,
  chunkRatio,
  decodeMetadata,
  findActiveLogSequence,
  findRegions,
  guidIsZero,
  hasFileSignature,
  knownItemEntries,
  parseFileIdentifier,
  parseHeader,
  parseMetadataTable,
  parseRegionTable,
  payloadBatIndex,
  setBatEntry,
  type LogEntry,
  type Parsed,
  type RegionEntry,
  type Regions,
  type VhdxHeader,
  type VhdxMetadata,
} from './codec.js';
import { ReplayedFile } from './replay.js';

/** Largest log we read into memory to replay (Hyper-V and qemu make 1 MiB logs). */
export const MAX_LOG_LENGTH = 64 * MiB;

export interface HeadState {
  fileSize: number;
  creator: string;
  headers: [Parsed<VhdxHeader>, Parsed<VhdxHeader>];
  slot: 0 | 1;
  header: VhdxHeader;
}

/** Identifier and headers; ForeignFormatError without the signature, CorruptImageError when nothing usable is left. */
export async function readHead(file: RandomAccessFile): Promise<HeadState> {
  const fileSize = await file.size();
  const sig = new Uint8Array(Math.min(8, fileSize));
  await file.read(sig, 0);
  if (!hasFileSignature(sig)) parseFileIdentifier(sig); // throws ForeignFormatError
  if (fileSize < HEAD_READ_SIZE) {
    throw new CorruptImageError(
      `the VHDX file is ${fileSize} bytes, shorter than its ${HEAD_READ_SIZE}-byte identifier, headers and region tables: it is truncated; copy it again`,
      { fileSize },
    );
  }
  const head = Buffer.alloc(HEADER_OFFSETS[1] + HEADER_SIZE);
  await file.read(head, 0);
  const { creator } = parseFileIdentifier(head);
  const headers: [Parsed<VhdxHeader>, Parsed<VhdxHeader>] = [
    parseHeader(head.subarray(HEADER_OFFSETS[0], HEADER_OFFSETS[0] + HEADER_SIZE)),
    parseHeader(head.subarray(HEADER_OFFSETS[1], HEADER_OFFSETS[1] + HEADER_SIZE)),
  ];
  const { slot, header } = chooseHeader(headers);
  checkHeaderVersion(header);
  return { fileSize, creator, headers, slot, header };
}

/** Sanity of the log fields of the current header (checked even when the log is empty). */
export function logPlacementProblem(h: VhdxHeader, fileSize: number): string | null {
  if (h.logVersion !== 0) return `the log version is ${h.logVersion}; only 0 exists`;
  if (h.logOffset < HEADER_SECTION_SIZE || h.logOffset % MiB !== 0) return `the log offset ${h.logOffset} is not a multiple of 1 MiB past the first 1 MiB`;
  if (h.logLength % MiB !== 0) return `the log length ${h.logLength} is not a multiple of 1 MiB`;
  if (h.logOffset + h.logLength > fileSize) return `the log (offset ${h.logOffset}, length ${h.logLength}) passes the end of the file (${fileSize} bytes)`;
  return null;
}

/** The active log sequence to replay, [] when LogGuid is zero or the log holds none. */
export async function readLog(file: RandomAccessFile, head: HeadState): Promise<LogEntry[]> {
  const h = head.header;
  if (guidIsZero(h.logGuid) || h.logLength === 0) return [];
  if (h.logVersion !== 0) {
    throw new UnsupportedVersionError(`the VHDX log version is ${h.logVersion}; only version 0 exists; open it with Hyper-V or a newer tool`);
  }
  const problem = logPlacementProblem(h, head.fileSize);
  if (problem) throw new CorruptImageError(`the VHDX file has a pending log but ${problem}; the file is damaged`);
  if (h.logLength > MAX_LOG_LENGTH) {
    throw new UnsupportedVersionError(
      `the VHDX log is ${h.logLength} bytes, more than the ${MAX_LOG_LENGTH} we replay in memory; replay it with Hyper-V or "qemu-img check -r all" on a copy`,
    );
  }
  const log = Buffer.alloc(h.logLength);
  await file.read(log, h.logOffset);
  return findActiveLogSequence(log, h.logGuid);
}

export interface RegionState {
  tables: [Parsed<RegionEntry[]>, Parsed<RegionEntry[]>];
  raw: [Buffer, Buffer];
  regions: Regions;
}

/** Both region tables (through the replayed view); the first valid one is used. */
export async function readRegionTables(view: ReplayedFile): Promise<RegionState> {
  const raw: [Buffer, Buffer] = [Buffer.alloc(REGION_TABLE_SIZE), Buffer.alloc(REGION_TABLE_SIZE)];
  await view.read(raw[0], REGION_TABLE_OFFSETS[0]);
  await view.read(raw[1], REGION_TABLE_OFFSETS[1]);
  const tables: [Parsed<RegionEntry[]>, Parsed<RegionEntry[]>] = [parseRegionTable(raw[0]), parseRegionTable(raw[1])];
  const use = tables[0].ok ? tables[0] : tables[1];
  if (!use.ok) {
    const why = (p: Parsed<RegionEntry[]>) => (p.ok ? 'is valid' : p.reason);
    throw new CorruptImageError(
      `no valid VHDX region table: table 1 (at 192 KiB) ${why(tables[0])}; table 2 (at 256 KiB) ${why(tables[1])}; the file is damaged, restore it from a copy`,
    );
  }
  return { tables, raw, regions: findRegions(use.value, view.size) };
}

export async function readMetadata(view: ReplayedFile, region: RegionEntry): Promise<VhdxMetadata> {
  const table = Buffer.alloc(METADATA_TABLE_SIZE);
  await view.read(table, region.fileOffset);
  const entries = knownItemEntries(parseMetadataTable(table, region.length));
  const items = [];
  for (const entry of entries) {
    const bytes = Buffer.alloc(entry.length); // at most 16 bytes: knownItemEntries checked each length
    await view.read(bytes, region.fileOffset + entry.offset);
    items.push({ entry, bytes });
  }
  return decodeMetadata(items);
}

/** The numbers every BAT computation needs. */
export interface Geometry {
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: number;
  chunkRatio: number;
  blockCount: number;
  batEntries: number;
  /** Bytes of BAT we keep: the entries rounded up to whole 4 KiB sectors (the unit we write). */
  batBytes: number;
}

export function geometryOf(m: VhdxMetadata): Geometry {
  const ratio = chunkRatio(m.logicalSectorSize, m.blockSize);
  const blockCount = ceilDiv(m.virtualSize, m.blockSize);
  const batEntries = batEntryCount(blockCount, ratio, m.hasParent);
  return {
    virtualSize: m.virtualSize,
    blockSize: m.blockSize,
    logicalSectorSize: m.logicalSectorSize,
    chunkRatio: ratio,
    blockCount,
    batEntries,
    batBytes: alignUp(batEntries * 8, LOG_SECTOR),
  };
}

export interface VhdxStructures {
  head: HeadState;
  log: LogEntry[];
  view: ReplayedFile;
  regionState: RegionState;
  metadata: VhdxMetadata;
  geometry: Geometry;
}

/** Everything up to (not including) the BAT contents, validated. Differencing disks are refused. */
export async function openStructures(file: RandomAccessFile): Promise<VhdxStructures> {
  const head = await readHead(file);
  const log = await readLog(file, head);
  const view = new ReplayedFile(file, head.fileSize, log);
  const regionState = await readRegionTables(view);
  const metadata = await readMetadata(view, regionState.regions.metadata);
  if (metadata.hasParent) {
    throw new UnsupportedVersionError(
      `${file.path} is a differencing VHDX (it has a parent disk); imagekeep reads only dynamic and fixed VHDX: merge it into its parent with Hyper-V (Merge-VHD) or "qemu-img convert" first`,
    );
  }
  const geometry = geometryOf(metadata);
  if (geometry.batEntries * 8 > regionState.regions.bat.length) {
    throw new CorruptImageError(
      `the VHDX BAT region is ${regionState.regions.bat.length} bytes but a ${metadata.virtualSize}-byte disk of ${metadata.blockSize}-byte blocks needs ${geometry.batEntries} entries (${geometry.batEntries * 8} bytes); the file is damaged`,
    );
  }
  return { head, log, view, regionState, metadata, geometry };
}

/**
 * The BAT, loaded in 1 MiB pages as reads reach them (a 64 TiB disk of 1 MiB blocks has a
 * 512 MiB BAT; a 2 TiB disk of 32 MiB blocks 512 KiB). Clean pages are dropped past 64; changed
 * 4 KiB sectors stay until written.
 */
export class BatTable {
  static readonly PAGE = MiB;
  static readonly MAX_CLEAN_PAGES = 64;
  private pages = new Map<number, Buffer>();
  private dirty = new Set<number>();

  /** `source` null: a new file whose BAT is all zeros (nothing to read). */
  constructor(
    private readonly source: ReplayedFile | null,
    readonly offset: number,
    readonly bytes: number,
  ) {}

  has(index: number): boolean {
    return this.pages.has(Math.floor((index * 8) / BatTable.PAGE));
  }

  async load(index: number): Promise<void> {
    const page = Math.floor((index * 8) / BatTable.PAGE);
    if (this.pages.has(page)) return;
    const start = page * BatTable.PAGE;
    const buf = Buffer.alloc(Math.min(BatTable.PAGE, this.bytes - start));
    if (this.source) await this.source.read(buf, this.offset + start);
    if (this.pages.size >= BatTable.MAX_CLEAN_PAGES) this.evictOne();
    this.pages.set(page, buf);
  }

  private evictOne(): void {
    const perPage = BatTable.PAGE / LOG_SECTOR;
    for (const [page] of this.pages) {
      let dirty = false;
      for (let s = page * perPage; s < (page + 1) * perPage && !dirty; s++) dirty = this.dirty.has(s);
      if (!dirty) {
        this.pages.delete(page);
        return;
      }
    }
  }

  private locate(index: number): { page: Buffer; at: number } {
    const byte = index * 8;
    const page = this.pages.get(Math.floor(byte / BatTable.PAGE));
    if (!page) throw new Error(`BAT entry ${index} used before its page was loaded`);
    return { page, at: (byte % BatTable.PAGE) / 8 };
  }

  state(index: number): number {
    const { page, at } = this.locate(index);
    return batState(page, at);
  }

  fileOffset(index: number): number {
    const { page, at } = this.locate(index);
    return batFileOffset(page, at);
  }

  reservedBits(index: number): number {
    const { page, at } = this.locate(index);
    return batReservedBits(page, at);
  }

  set(index: number, state: number, fileOffset: number): void {
    const { page, at } = this.locate(index);
    setBatEntry(page, at, state, fileOffset);
    this.dirty.add(Math.floor((index * 8) / LOG_SECTOR));
  }

  get changed(): boolean {
    return this.dirty.size > 0;
  }

  /** Writes the changed 4 KiB sectors, one write per run of adjacent ones. */
  async writeChanged(file: RandomAccessFile): Promise<void> {
    const sectors = [...this.dirty].sort((a, b) => a - b);
    let i = 0;
    while (i < sectors.length) {
      let j = i;
      while (j + 1 < sectors.length && sectors[j + 1] === sectors[j] + 1) j++;
      const from = sectors[i] * LOG_SECTOR;
      const to = (sectors[j] + 1) * LOG_SECTOR;
      const out = Buffer.alloc(to - from);
      for (let s = sectors[i]; s <= sectors[j]; s++) {
        const byte = s * LOG_SECTOR;
        const page = this.pages.get(Math.floor(byte / BatTable.PAGE));
        if (!page) throw new Error(`changed BAT sector ${s} has no page`);
        const at = byte % BatTable.PAGE;
        page.copy(out, byte - from, at, at + LOG_SECTOR);
      }
      await file.write(out, this.offset + from);
      i = j + 1;
    }
    this.dirty.clear();
  }
}

/** What a payload block holds: its file offset, or -1 when it reads as zeros. */
export function blockLocation(bat: BatTable, g: Geometry, block: number, fileSize: number): number {
  const index = payloadBatIndex(block, g.chunkRatio);
  const state = bat.state(index);
  switch (state) {
    case PAYLOAD_NOT_PRESENT:
    case PAYLOAD_UNDEFINED:
    case PAYLOAD_ZERO:
    case PAYLOAD_UNMAPPED:
      return -1;
    case PAYLOAD_FULLY_PRESENT: {
      const offset = bat.fileOffset(index);
      const used = Math.min(g.blockSize, g.virtualSize - block * g.blockSize);
      if (offset < HEADER_SECTION_SIZE || offset + used > fileSize) {
        throw new CorruptImageError(
          `VHDX payload block ${block} (BAT entry ${index}) is at file offset ${offset}, but its ${used} bytes must lie between 1 MiB and the end of the file (${fileSize} bytes): the file is truncated or damaged`,
          { block, offset, fileSize },
        );
      }
      return offset;
    }
    case PAYLOAD_PARTIALLY_PRESENT:
      throw new CorruptImageError(`VHDX payload block ${block} (BAT entry ${index}) is PARTIALLY_PRESENT, a state only differencing disks use; the file is damaged`);
    default:
      throw new CorruptImageError(`VHDX payload block ${block} (BAT entry ${index}) has state ${state}, which MS-VHDX does not define; the file is damaged`);
  }
}

/**
 * Reads virtual bytes [at, at + into.length): one file read per run of blocks that are
 * contiguous in the file, zeros for blocks that are not present.
 */
export async function readVirtual(view: ReplayedFile, bat: BatTable, g: Geometry, into: Uint8Array, at: number): Promise<void> {
  if (at < 0 || at + into.length > g.virtualSize || !Number.isInteger(at)) {
    throw new RangeError(`read of ${into.length} bytes at ${at} passes the VHDX disk size ${g.virtualSize}`);
  }
  let runFile = -1;
  let runStart = 0;
  let runLength = 0;
  const flushRun = async () => {
    if (runLength > 0) await view.read(into.subarray(runStart, runStart + runLength), runFile);
    runLength = 0;
  };
  let pos = 0;
  while (pos < into.length) {
    const v = at + pos;
    const block = Math.floor(v / g.blockSize);
    const inBlock = v - block * g.blockSize;
    const n = Math.min(g.blockSize - inBlock, into.length - pos);
    const index = payloadBatIndex(block, g.chunkRatio);
    if (!bat.has(index)) await bat.load(index);
    const offset = blockLocation(bat, g, block, view.size);
    if (offset < 0) {
      await flushRun();
      into.fill(0, pos, pos + n);
    } else if (runLength > 0 && runFile + runLength === offset + inBlock) {
      runLength += n;
    } else {
      await flushRun();
      runFile = offset + inBlock;
      runStart = pos;
      runLength = n;
    }
    pos += n;
  }
  await flushRun();
}

/** The virtual ranges of present blocks, merged where adjacent. */
export async function allocatedRanges(view: ReplayedFile, bat: BatTable, g: Geometry): Promise<ByteRange[]> {
  const out: ByteRange[] = [];
  for (let block = 0; block < g.blockCount; block++) {
    const index = payloadBatIndex(block, g.chunkRatio);
    if (!bat.has(index)) await bat.load(index);
    if (blockLocation(bat, g, block, view.size) < 0) continue;
    const offset = block * g.blockSize;
    const length = Math.min(g.blockSize, g.virtualSize - offset);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length });
  }
  return out;
}
