/**
 * Reads a VHD file's structures (footers, dynamic header, BAT, parent locators) and
 * judges them, in one place for the reader, the grow-in-place writer and `check`.
 *
 * Every finding is a Problem: a sentence, and whether it is fatal. The reader refuses a
 * disk with a fatal problem (the first one becomes the typed error) and tolerates the
 * rest, above all a missing or stale trailing footer, which is what a writer killed
 * between a block's data and its footer leaves behind (qemu also reads the copy at 0).
 * `check` reports every problem. Nothing is allocated from a size field before that field
 * is bounded: the BAT is read only once it is known to lie inside the file and to cover at
 * most 2040 GiB, locator data at most 64 KiB per entry.
 */
import { ceilDiv, SECTOR } from '../bytes.js';
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import {
  batBytes,
  bitmapBytes,
  chsBytes,
  chsGeometry,
  decodeBat,
  decodeFooter,
  decodeHeader,
  decodeLocatorPath,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  FEATURE_RESERVED,
  FOOTER_SIZE,
  footerDefect,
  hasFooterCookie,
  HEADER_SIZE,
  headerDefect,
  isMaxGeometry,
  isPowerOfTwo,
  MAX_BLOCK_SIZE,
  MAX_VHD_SIZE,
  MIN_BLOCK_SIZE,
  qemuSeenSize,
  UNALLOCATED,
  type VhdFooter,
  type VhdHeader,
} from './codec.js';

export type VhdSubformat = 'fixed' | 'dynamic' | 'differencing';

export interface Problem {
  message: string;
  /** The reader refuses the disk. */
  fatal: boolean;
  /** Refused because we do not support it rather than because it is damaged. */
  unsupported?: boolean;
}

/** A path a differencing disk's locator (or its parent-name field) gives for its parent. */
export interface ParentPath {
  source: string;
  path: string;
}

export interface VhdStructure {
  fileSize: number;
  subformat: VhdSubformat;
  /** The footer we go by: the trailing one of a fixed disk, the copy at 0 of a dynamic one when sound. */
  footer: VhdFooter;
  footerBytes: Buffer;
  footerSource: 'head' | 'tail';
  /** Virtual size in bytes (current size). */
  size: number;
  /** Dynamic and differencing disks only from here on (fixed: null / 0). */
  header: VhdHeader | null;
  blockSize: number;
  bitmapSize: number;
  /** Blocks that cover the virtual size: ceil(size / blockSize). */
  blockCount: number;
  /** The first `blockCount` BAT entries (sector numbers or UNALLOCATED). */
  bat: Uint32Array | null;
  allocatedBlocks: number;
  /** Where the trailing footer belongs: the end of the last structure or block the file's metadata refers to. */
  dataEnd: number;
  /** The trailing footer is sound, identical to the one we go by, and sits at dataEnd. */
  trailingSound: boolean;
  parentPaths: ParentPath[];
}

export interface Inspection {
  structure: VhdStructure | null;
  problems: Problem[];
}

const MAX_LOCATOR_BYTES = 64 * 1024;

/** Locator codes in the order we try them: relative paths first, they survive moving a folder. */
const LOCATOR_ORDER = ['W2ru', 'W2ku', 'MacX', 'Wi2r', 'Wi2k'];

interface Region {
  what: string;
  start: number;
  end: number;
}

async function readAt(file: RandomAccessFile, at: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await file.read(b, at);
  return b;
}

/**
 * Reads and judges the file's structures. Throws ForeignFormatError when neither end of
 * the file holds a VHD footer cookie; every other finding is in `problems`.
 */
export async function inspectVhd(file: RandomAccessFile): Promise<Inspection> {
  const problems: Problem[] = [];
  const fatal = (message: string, unsupported = false): Inspection => {
    problems.push({ message, fatal: true, unsupported });
    return { structure: null, problems };
  };
  const note = (message: string): void => {
    problems.push({ message, fatal: false });
  };

  const fileSize = await file.size();
  if (fileSize < FOOTER_SIZE) {
    const head = await readAt(file, 0, fileSize);
    if (hasFooterCookie(head)) return fatal(`${file.path} is ${fileSize} bytes, shorter than the 512-byte VHD footer it starts with: it was truncated`);
    throw new ForeignFormatError(`${file.path} is not a VHD: at ${fileSize} bytes it is too short to hold the 512-byte footer`);
  }
  const head = await readAt(file, 0, FOOTER_SIZE);
  const tail = await readAt(file, fileSize - FOOTER_SIZE, FOOTER_SIZE);
  const headDefect = footerDefect(head);
  const tailDefect = footerDefect(tail);
  const headFooter = headDefect === null ? decodeFooter(head) : null;
  const tailFooter = tailDefect === null ? decodeFooter(tail) : null;

  let footer: VhdFooter;
  let footerBytes: Buffer;
  let footerSource: 'head' | 'tail';
  // A dynamic disk starts with its footer copy (qemu's probe); a fixed disk's footer is its
  // last sector. A sound dynamic footer at 0 wins: the first sector of a fixed disk is the
  // guest's boot sector, while the last sector of a dynamic disk whose writer was killed is
  // guest data that could be anything, even a fixed VHD's footer.
  if (headFooter && (headFooter.diskType === DISK_DYNAMIC || headFooter.diskType === DISK_DIFFERENCING)) {
    [footer, footerBytes, footerSource] = [headFooter, head, 'head'];
  } else if (tailFooter && tailFooter.diskType === DISK_FIXED && tailFooter.currentSize <= fileSize - FOOTER_SIZE) {
    [footer, footerBytes, footerSource] = [tailFooter, tail, 'tail'];
  } else if (tailFooter && (tailFooter.diskType === DISK_DYNAMIC || tailFooter.diskType === DISK_DIFFERENCING)) {
    [footer, footerBytes, footerSource] = [tailFooter, tail, 'tail'];
    note(`the footer copy at offset 0 is unusable (${headDefect ?? `it says disk type ${headFooter?.diskType}`}); the trailing copy is used`);
  } else if (tailFooter && tailFooter.diskType === DISK_FIXED) {
    return fatal(
      `${file.path} is a fixed VHD of ${tailFooter.currentSize} bytes but the file holds only ${fileSize - FOOTER_SIZE} bytes before its footer: it was truncated`,
    );
  } else if (headFooter || tailFooter) {
    const f = (headFooter ?? tailFooter)!;
    return fatal(`${file.path} has VHD disk type ${f.diskType}; only 2 (fixed), 3 (dynamic) and 4 (differencing) exist`, true);
  } else if (hasFooterCookie(head) || hasFooterCookie(tail)) {
    return fatal(
      `${file.path} has no sound VHD footer: the copy at offset 0 is unusable because ${headDefect}, ` +
        `and the copy in the last 512 bytes because ${tailDefect}; the image is damaged`,
    );
  } else {
    throw new ForeignFormatError(`${file.path} is not a VHD: neither its first nor its last 512 bytes start with the cookie "conectix"`);
  }

  const subformat: VhdSubformat = footer.diskType === DISK_FIXED ? 'fixed' : footer.diskType === DISK_DYNAMIC ? 'dynamic' : 'differencing';
  const size = footer.currentSize;
  if (footer.formatVersion >>> 16 !== 1) {
    return fatal(`${file.path} is VHD format version 0x${footer.formatVersion.toString(16)}; only major version 1 is defined`, true);
  }
  if (size % SECTOR !== 0) return fatal(`${file.path} claims a virtual size of ${size} bytes, not a multiple of 512: the footer lies`);
  if (size > MAX_VHD_SIZE) {
    return fatal(`${file.path} claims a virtual size of ${size} bytes, above the VHD limit of 2040 GiB (${MAX_VHD_SIZE} bytes): the footer lies`);
  }
  if ((footer.features & FEATURE_RESERVED) === 0) note(`the footer's features field 0x${footer.features.toString(16)} lacks the reserved bit 0x2 the spec requires`);
  if (footer.savedState !== 0) note(`the footer's saved-state flag is set: a VM was saved while using this disk`);
  const chs = chsGeometry(size);
  const g = footer.geometry;
  if (!isMaxGeometry(g) && (g.cylinders !== chs.cylinders || g.heads !== chs.heads || g.sectorsPerTrack !== chs.sectorsPerTrack)) {
    note(`the geometry is ${g.cylinders}/${g.heads}/${g.sectorsPerTrack} but the spec computes ${chs.cylinders}/${chs.heads}/${chs.sectorsPerTrack} for ${size} bytes`);
  }
  const seen = qemuSeenSize(footer);
  if (seen !== size) {
    note(`qemu will see ${seen} bytes, not ${size}: creator "${footer.creatorApp}" makes it size the disk from the geometry (${chsBytes(g)} bytes)`);
  }

  const base = {
    fileSize,
    subformat,
    footer,
    footerBytes,
    footerSource,
    size,
    header: null,
    blockSize: 0,
    bitmapSize: 0,
    blockCount: 0,
    bat: null,
    allocatedBlocks: 0,
    dataEnd: size,
    trailingSound: true,
    parentPaths: [],
  };
  if (subformat === 'fixed') {
    if (footer.dataOffset !== null) note(`a fixed disk's data offset should be all ones, not ${footer.dataOffset}`);
    if (size !== fileSize - FOOTER_SIZE) {
      note(`the fixed disk holds ${fileSize - FOOTER_SIZE} bytes before its footer but its size is ${size}: ${fileSize - FOOTER_SIZE - size} bytes are unused`);
    }
    return { structure: base, problems };
  }

  // ---- dynamic and differencing ----
  const hdrAt = footer.dataOffset;
  if (hdrAt === null || hdrAt < FOOTER_SIZE || hdrAt + HEADER_SIZE > fileSize) {
    return fatal(`${file.path}: the dynamic header offset ${hdrAt ?? 'all-ones'} does not leave room for its 1024 bytes inside the file (${fileSize} bytes)`);
  }
  if (hdrAt % SECTOR !== 0) note(`the dynamic header at ${hdrAt} is not sector-aligned`);
  const headerBytes = await readAt(file, hdrAt, HEADER_SIZE);
  const hDefect = headerDefect(headerBytes);
  if (hDefect) return fatal(`${file.path}: the dynamic disk header at ${hdrAt} is damaged: ${hDefect}`);
  const header = decodeHeader(headerBytes);
  if (header.headerVersion >>> 16 !== 1) {
    return fatal(`${file.path}: dynamic header version 0x${header.headerVersion.toString(16)} is not 1.x`, true);
  }
  const bs = header.blockSize;
  if (!isPowerOfTwo(bs)) return fatal(`${file.path}: the block size ${bs} is not a power of two: the header lies`);
  if (bs < MIN_BLOCK_SIZE || bs > MAX_BLOCK_SIZE) {
    return fatal(`${file.path}: block size ${bs} bytes is outside what imagekeep reads (${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE} bytes)`, true);
  }
  if (header.dataOffset !== null) note(`the dynamic header's data offset should be all ones, not ${header.dataOffset}`);
  const blockCount = ceilDiv(size, bs);
  if (header.maxTableEntries < blockCount) {
    return fatal(
      `${file.path}: the BAT has ${header.maxTableEntries} entries but a ${size}-byte disk of ${bs}-byte blocks needs ${blockCount}: the header lies`,
    );
  }
  const tableOffset = header.tableOffset;
  if (tableOffset + header.maxTableEntries * 4 > fileSize) {
    return fatal(
      `${file.path}: the BAT of ${header.maxTableEntries} entries at offset ${tableOffset} passes the end of the file (${fileSize} bytes): the file is truncated or the header lies`,
    );
  }
  if (tableOffset % SECTOR !== 0) note(`the BAT at ${tableOffset} is not sector-aligned`);
  const bitmapSize = bitmapBytes(bs);
  // blockCount ≤ 2040 GiB / 64 KiB and blockCount·4 ≤ file size: the allocation is bounded.
  const bat = decodeBat(await readAt(file, tableOffset, blockCount * 4), blockCount);

  const meta: Region[] = [
    { what: 'the footer copy at 0', start: 0, end: FOOTER_SIZE },
    { what: 'the dynamic header', start: hdrAt, end: hdrAt + HEADER_SIZE },
    { what: 'the BAT', start: tableOffset, end: tableOffset + batBytes(header.maxTableEntries) },
  ];

  const parentPaths: ParentPath[] = [];
  if (subformat === 'differencing') {
    if (header.parentUniqueId.every((x) => x === 0)) note(`the differencing disk's parent unique id is all zeros`);
    const found: ParentPath[] = [];
    for (const [i, loc] of header.locators.entries()) {
      if (loc.platformCode === '' || loc.dataLength === 0) continue;
      if (loc.dataLength > MAX_LOCATOR_BYTES || loc.dataOffset + loc.dataLength > fileSize) {
        note(`parent locator ${i} (${loc.platformCode}) claims ${loc.dataLength} bytes at ${loc.dataOffset}, outside the file or above ${MAX_LOCATOR_BYTES}; it is ignored`);
        continue;
      }
      meta.push({ what: `parent locator ${i} (${loc.platformCode})`, start: loc.dataOffset, end: loc.dataOffset + loc.dataLength });
      const path = decodeLocatorPath(loc.platformCode, await readAt(file, loc.dataOffset, loc.dataLength));
      if (path !== null) found.push({ source: loc.platformCode, path });
    }
    for (const code of LOCATOR_ORDER) parentPaths.push(...found.filter((p) => p.source === code));
    if (header.parentName !== '') parentPaths.push({ source: 'parent name', path: header.parentName });
    if (parentPaths.length === 0) note(`the differencing disk names no parent: no usable parent locator and an empty parent name`);
  }

  // The metadata must not overlap itself (sorted sweep over a handful of regions).
  const sortedMeta = [...meta].sort((a, b) => a.start - b.start);
  for (let i = 1; i < sortedMeta.length; i++) {
    const a = sortedMeta[i - 1]!;
    const b = sortedMeta[i]!;
    if (b.start < a.end) return fatal(`${file.path}: ${b.what} at ${b.start} overlaps ${a.what} (${a.start}..${a.end}): the header lies`);
  }
  let dataEnd = Math.max(...meta.map((r) => r.end));

  // Blocks: inside the file (at least the part of the last block that the virtual size
  // covers), clear of the metadata and of each other.
  const span = bitmapSize + bs;
  const starts: number[] = [];
  for (let i = 0; i < blockCount; i++) {
    const e = bat[i]!;
    if (e === UNALLOCATED) continue;
    const start = e * SECTOR;
    const needed = bitmapSize + Math.min(bs, size - i * bs);
    if (start + needed > fileSize) {
      return fatal(`${file.path}: block ${i} at offset ${start} ends at ${start + needed}, past the end of the file (${fileSize} bytes): the file is truncated or the BAT lies`);
    }
    for (const r of meta) {
      if (start < r.end && r.start < start + span) {
        return fatal(`${file.path}: block ${i} at offset ${start} overlaps ${r.what} (${r.start}..${r.end}): the BAT lies`);
      }
    }
    starts.push(start);
  }
  const sorted = Float64Array.from(starts).sort();
  for (let k = 1; k < sorted.length; k++) {
    if (sorted[k]! < sorted[k - 1]! + span) {
      const a = sorted[k - 1]!;
      const b = sorted[k]!;
      const ia = bat.indexOf(a / SECTOR);
      const ib = a === b ? bat.indexOf(b / SECTOR, ia + 1) : bat.indexOf(b / SECTOR);
      return fatal(`${file.path}: blocks ${ia} (at offset ${a}) and ${ib} (at offset ${b}) overlap, each taking ${span} bytes: the BAT lies`);
    }
  }
  if (sorted.length > 0) dataEnd = Math.max(dataEnd, sorted[sorted.length - 1]! + span);

  // The trailing footer: present, identical to the one we go by, right after the data.
  const tailAt = fileSize - FOOTER_SIZE;
  if (footerSource === 'tail') {
    // Already noted above: the copy at 0 is the damaged one.
  } else if (tailDefect !== null) {
    note(`the trailing footer is missing or damaged (${tailDefect}): a writer was interrupted; opening the disk for writing repairs it`);
  } else if (!tail.equals(footerBytes)) {
    note(`the trailing footer differs from the copy at offset 0 (first at byte ${firstDifference(tail, footerBytes)})`);
  } else if (tailAt < dataEnd) {
    note(`the last block ends at ${dataEnd}, past the trailing footer at ${tailAt}`);
  } else if (tailAt > dataEnd) {
    note(`${tailAt - dataEnd} bytes between the last block (ending at ${dataEnd}) and the trailing footer are not referenced by the BAT, space left by an interrupted writer`);
  }
  const trailingSound = footerSource === 'head' && tailDefect === null && tail.equals(footerBytes) && tailAt === dataEnd;
  if (fileSize < dataEnd) note(`the file (${fileSize} bytes) ends inside its last block, which ends at ${dataEnd}`);

  return {
    structure: {
      ...base,
      header,
      blockSize: bs,
      bitmapSize,
      blockCount,
      bat,
      allocatedBlocks: starts.length,
      dataEnd,
      trailingSound,
      parentPaths,
    },
    problems,
  };
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return Math.min(a.length, b.length);
}

/** The structure, or the first fatal problem as a typed error. */
export async function loadVhd(file: RandomAccessFile): Promise<VhdStructure> {
  const { structure, problems } = await inspectVhd(file);
  const first = problems.find((p) => p.fatal);
  if (first) {
    throw first.unsupported
      ? new UnsupportedVersionError(`${first.message}; qemu-img convert -O vpc can rewrite it in a form imagekeep reads`)
      : new CorruptImageError(`${first.message}; the disk is damaged: use another copy of it, or export it again`);
  }
  if (!structure) throw new CorruptImageError(`${file.path}: the VHD structures could not be read`);
  return structure;
}
