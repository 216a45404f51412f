/**
 * Our own structure check of a VHDX file: what the independent tools do not look at.
 * qemu-img check looks at BAT bounds and overlaps but not at the chunk-ratio interleave (a
 * missing sector-bitmap slot passes it and only shows as wrong content), and libvhdi checks no
 * header CRC and ignores the log. So: both headers' CRCs, both region tables' CRCs and their
 * equality, metadata sanity, every BAT entry (state, reserved bits, inside the file,
 * 1 MiB-aligned, no overlaps, nothing at a sector-bitmap index of a non-differencing disk), the
 * log (empty or replayable) and a file length in whole MiB.
 */
import type { StructureReport } from '../disk-image.js';
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  HEADER_SECTION_SIZE,
  MiB,
  PAYLOAD_FULLY_PRESENT,
  PAYLOAD_NOT_PRESENT,
  PAYLOAD_PARTIALLY_PRESENT,
  PAYLOAD_UNDEFINED,
  PAYLOAD_UNMAPPED,
  PAYLOAD_ZERO,
  guidIsZero,
  isSectorBitmapIndex,
  type LogEntry,
} from './codec.js';
import {
  BatTable,
  geometryOf,
  logPlacementProblem,
  readHead,
  readLog,
  readMetadata,
  readRegionTables,
  type HeadState,
  type RegionState,
} from './image.js';
import { ReplayedFile } from './replay.js';

/** Per kind of BAT problem, how many examples are spelled out before a count. */
const EXAMPLES = 3;

class ProblemList {
  readonly problems: string[] = [];
  private counts = new Map<string, number>();

  add(text: string): void {
    this.problems.push(text);
  }

  /** A repeated kind of problem: the first few verbatim, then one summary line. */
  addOf(kind: string, text: string): void {
    const n = (this.counts.get(kind) ?? 0) + 1;
    this.counts.set(kind, n);
    if (n <= EXAMPLES) this.problems.push(text);
  }

  summarize(): string[] {
    for (const [kind, n] of this.counts) if (n > EXAMPLES) this.problems.push(`${n - EXAMPLES} more BAT entries with the same problem: ${kind}`);
    return this.problems;
  }
}

function typed(e: unknown): e is CorruptImageError | UnsupportedVersionError {
  return e instanceof CorruptImageError || e instanceof UnsupportedVersionError;
}

export async function checkVhdx(file: RandomAccessFile): Promise<StructureReport> {
  const p = new ProblemList();
  const layout: StructureReport['layout'] = {};
  const done = (): StructureReport => ({ problems: p.summarize(), layout });

  let head: HeadState;
  try {
    head = await readHead(file);
  } catch (e) {
    if (e instanceof ForeignFormatError || !typed(e)) throw e;
    p.add(e.message);
    return done();
  }
  const { fileSize, header } = head;
  layout.fileSize = fileSize;
  layout.creator = head.creator;
  layout.currentHeader = head.slot + 1;
  layout.sequenceNumber = Number(header.sequenceNumber);
  head.headers.forEach((h, i) => {
    if (!h.ok) p.add(`header ${i + 1} (at ${64 * (i + 1)} KiB) is invalid: its ${h.reason}; the other header is used`);
  });
  if (fileSize % MiB !== 0) p.add(`the file is ${fileSize} bytes, not a whole number of MiB (VHDX grows in 1 MiB units)`);

  layout.logOffset = header.logOffset;
  layout.logLength = header.logLength;
  layout.logGuidZero = guidIsZero(header.logGuid);
  const placement = logPlacementProblem(header, fileSize);
  if (placement) p.add(`the log header fields are wrong: ${placement}`);
  let log: LogEntry[];
  let view: ReplayedFile;
  try {
    log = await readLog(file, head);
    view = new ReplayedFile(file, fileSize, log);
  } catch (e) {
    if (!typed(e)) throw e;
    p.add(e.message);
    return done();
  }
  layout.logPending = log.length > 0;
  layout.logEntries = log.length;

  let rs: RegionState;
  try {
    rs = await readRegionTables(view);
  } catch (e) {
    if (!typed(e)) throw e;
    p.add(e.message);
    return done();
  }
  rs.tables.forEach((t, i) => {
    if (!t.ok) p.add(`region table ${i + 1} (at ${192 + 64 * i} KiB) is invalid: its ${t.reason}`);
  });
  if (rs.tables[0].ok && rs.tables[1].ok && !rs.raw[0].equals(rs.raw[1])) p.add('the two region tables differ; they must be identical copies');
  const { bat: batRegion, metadata: metaRegion } = rs.regions;
  layout.batOffset = batRegion.fileOffset;
  layout.batLength = batRegion.length;
  layout.metadataOffset = metaRegion.fileOffset;
  layout.metadataLength = metaRegion.length;

  let metadata;
  try {
    metadata = await readMetadata(view, metaRegion);
  } catch (e) {
    if (!typed(e)) throw e;
    p.add(e.message);
    return done();
  }
  if (metadata.hasParent) {
    throw new UnsupportedVersionError(`${file.path} is a differencing VHDX; imagekeep does not check differencing disks`);
  }
  const g = geometryOf(metadata);
  layout.subformat = metadata.leaveBlocksAllocated ? 'fixed' : 'dynamic';
  layout.virtualSize = g.virtualSize;
  layout.blockSize = g.blockSize;
  layout.logicalSectorSize = g.logicalSectorSize;
  layout.physicalSectorSize = metadata.physicalSectorSize;
  layout.chunkRatio = g.chunkRatio;
  layout.blockCount = g.blockCount;
  layout.batEntries = g.batEntries;
  if (g.batEntries * 8 > batRegion.length) {
    p.add(`the BAT region holds ${batRegion.length / 8} entries but the disk needs ${g.batEntries}`);
    return done();
  }

  // The fixed structures, checked against each other and against every payload block.
  const structures: { start: number; end: number; what: string }[] = [
    { start: 0, end: HEADER_SECTION_SIZE, what: 'the header section' },
    { start: batRegion.fileOffset, end: batRegion.fileOffset + batRegion.length, what: 'the BAT region' },
    { start: metaRegion.fileOffset, end: metaRegion.fileOffset + metaRegion.length, what: 'the metadata region' },
  ];
  if (header.logLength > 0) structures.push({ start: header.logOffset, end: header.logOffset + header.logLength, what: 'the log' });
  for (let i = 0; i < structures.length; i++) {
    for (let j = i + 1; j < structures.length; j++) {
      const a = structures[i];
      const b = structures[j];
      if (a.start < b.end && b.start < a.end) p.add(`${a.what} (file offset ${a.start}) overlaps ${b.what} (file offset ${b.start})`);
    }
  }
  // Payload block offsets, sorted afterwards to find blocks that overlap each other.
  const starts: number[] = [];
  const lastUsed = g.virtualSize - (g.blockCount - 1) * g.blockSize;
  let lastBlockOffset = -1;

  const bat = new BatTable(view, batRegion.fileOffset, g.batBytes);
  let allocatedBlocks = 0;
  let dataEnd = 0;
  for (let index = 0; index < g.batEntries; index++) {
    if (!bat.has(index)) await bat.load(index);
    const state = bat.state(index);
    if (bat.reservedBits(index) !== 0) p.addOf('reserved bits set', `BAT entry ${index} has reserved bits 3-19 set; they must be zero`);
    if (isSectorBitmapIndex(index, g.chunkRatio)) {
      if (state !== 0) {
        p.addOf(
          'a sector-bitmap slot in use',
          `BAT entry ${index} is the sector-bitmap slot of chunk ${Math.floor(index / (g.chunkRatio + 1))} (chunk ratio ${g.chunkRatio}) but holds state ${state}: a non-differencing disk has none, so payload entries are not interleaved correctly`,
        );
      }
      continue;
    }
    const block = index - Math.floor(index / (g.chunkRatio + 1));
    switch (state) {
      case PAYLOAD_NOT_PRESENT:
      case PAYLOAD_UNDEFINED:
      case PAYLOAD_ZERO:
      case PAYLOAD_UNMAPPED:
        break;
      case PAYLOAD_FULLY_PRESENT: {
        allocatedBlocks++;
        const offset = bat.fileOffset(index);
        const used = Math.min(g.blockSize, g.virtualSize - block * g.blockSize);
        if (offset < HEADER_SECTION_SIZE || offset + used > view.size) {
          p.addOf('a block outside the file', `payload block ${block} (BAT entry ${index}) at file offset ${offset} with ${used} bytes is not inside the file (${view.size} bytes past the first 1 MiB)`);
        }
        starts.push(offset);
        if (block === g.blockCount - 1) lastBlockOffset = offset;
        for (const st of structures) {
          if (offset < st.end && st.start < offset + used) p.addOf('overlapping space', `payload block ${block} (file offset ${offset}) overlaps ${st.what}`);
        }
        dataEnd = Math.max(dataEnd, offset + used);
        break;
      }
      case PAYLOAD_PARTIALLY_PRESENT:
        p.addOf('PARTIALLY_PRESENT', `payload block ${block} (BAT entry ${index}) is PARTIALLY_PRESENT, which only differencing disks use`);
        break;
      default:
        p.addOf('an undefined state', `payload block ${block} (BAT entry ${index}) has state ${state}, which MS-VHDX does not define`);
    }
  }
  const sorted = Float64Array.from(starts).sort();
  for (let i = 1; i < sorted.length; i++) {
    const prevLength = sorted[i - 1] === lastBlockOffset ? lastUsed : g.blockSize;
    if (sorted[i] < sorted[i - 1] + prevLength) p.addOf('overlapping space', `two payload blocks overlap: one at file offset ${sorted[i - 1]}, one at ${sorted[i]}`);
  }
  layout.allocatedBlocks = allocatedBlocks;
  layout.dataEnd = dataEnd;
  return done();
}
