/**
 * VHDX (MS-VHDX 1.0) structures as pure functions over buffers: the file type identifier, the
 * two headers, the two region tables, the metadata table and its items, BAT entries and the
 * chunk-ratio interleave, and log entries. No I/O here; the reader and writer do that.
 *
 * All integers are little-endian. GUIDs are kept as their 16 on-disk bytes (Microsoft's
 * mixed-endian order, Python's `uuid.bytes_le`). Offsets above 2^31 are handled with arithmetic,
 * never with bit operators; 64-bit fields are read as two 32-bit halves or as bigint.
 */
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import { crc32c } from './crc32c.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const TiB = 1024 * 1024 * MiB;

/** Fixed positions of the header section (the first 1 MiB). */
export const FILE_ID_OFFSET = 0;
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
/** A header slot is 64 KiB, of which the first 4 KiB are checksummed. */
export const HEADER_SIZE = 4 * KiB;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const REGION_TABLE_SIZE = 64 * KiB;
export const HEADER_SECTION_SIZE = MiB;
/** Bytes the opening structures take: identifier, two headers, two region tables. */
export const HEAD_READ_SIZE = 320 * KiB;

/** MS-VHDX limits. */
export const MAX_VIRTUAL_SIZE = 64 * TiB;
export const MIN_BLOCK_SIZE = MiB;
export const MAX_BLOCK_SIZE = 256 * MiB;
export const MAX_REGION_ENTRIES = 2047;
export const MAX_METADATA_ENTRIES = 2047;
export const METADATA_TABLE_SIZE = 64 * KiB;
export const LOG_SECTOR = 4 * KiB;

const SIGNATURE_FILE = 'vhdxfile';

// ---------------------------------------------------------------- GUIDs

export type Guid = Uint8Array;

/** "2DC27766-F623-4200-9D64-115E9BFD4A08" → its 16 on-disk bytes (first three fields little-endian). */
export function guidFromString(text: string): Guid {
  const hex = text.replace(/[{}-]/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new RangeError(`not a GUID: ${text}`);
  const b = Buffer.from(hex, 'hex');
  const out = Buffer.alloc(16);
  out.writeUInt32LE(b.readUInt32BE(0), 0);
  out.writeUInt16LE(b.readUInt16BE(4), 4);
  out.writeUInt16LE(b.readUInt16BE(6), 6);
  b.copy(out, 8, 8, 16);
  return out;
}

export function guidToString(guid: Guid): string {
  const b = Buffer.from(guid.buffer, guid.byteOffset, 16);
  const h = (n: number, width: number) => n.toString(16).padStart(width, '0');
  const tail = b.subarray(8, 16).toString('hex');
  return `${h(b.readUInt32LE(0), 8)}-${h(b.readUInt16LE(4), 4)}-${h(b.readUInt16LE(6), 4)}-${tail.slice(0, 4)}-${tail.slice(4)}`.toUpperCase();
}

export function guidEquals(a: Guid, b: Guid): boolean {
  for (let i = 0; i < 16; i++) if (a[i] !== b[i]) return false;
  return true;
}

export const ZERO_GUID: Guid = new Uint8Array(16);

export function guidIsZero(g: Guid): boolean {
  return guidEquals(g, ZERO_GUID);
}

export const REGION_BAT = guidFromString('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const REGION_METADATA = guidFromString('8B7CA206-4790-4B9A-B8FE-575F050F886E');

export const ITEM_FILE_PARAMETERS = guidFromString('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const ITEM_VIRTUAL_DISK_SIZE = guidFromString('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const ITEM_PAGE83 = guidFromString('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const ITEM_LOGICAL_SECTOR_SIZE = guidFromString('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const ITEM_PHYSICAL_SECTOR_SIZE = guidFromString('CDA348C7-445D-4471-9CC9-E9885251C556');
export const ITEM_PARENT_LOCATOR = guidFromString('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');

/** The items we understand, with the exact payload length each must have (0: any length). */
const KNOWN_ITEMS: { guid: Guid; name: string; length: number }[] = [
  { guid: ITEM_FILE_PARAMETERS, name: 'File Parameters', length: 8 },
  { guid: ITEM_VIRTUAL_DISK_SIZE, name: 'Virtual Disk Size', length: 8 },
  { guid: ITEM_PAGE83, name: 'Virtual Disk ID', length: 16 },
  { guid: ITEM_LOGICAL_SECTOR_SIZE, name: 'Logical Sector Size', length: 4 },
  { guid: ITEM_PHYSICAL_SECTOR_SIZE, name: 'Physical Sector Size', length: 4 },
  { guid: ITEM_PARENT_LOCATOR, name: 'Parent Locator', length: 0 },
];

// ---------------------------------------------------------------- small readers

function view(buf: Uint8Array): Buffer {
  return Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}

function ascii(buf: Uint8Array, at: number, length: number): string {
  return view(buf).toString('latin1', at, at + length);
}

/** A u64 field as a number; fields that would pass 2^53 are reported as corrupt by the caller's check. */
export function readU64(buf: Uint8Array, at: number): number {
  const b = view(buf);
  return b.readUInt32LE(at + 4) * 2 ** 32 + b.readUInt32LE(at);
}

export function writeU64(buf: Uint8Array, value: number, at: number): void {
  const b = view(buf);
  b.writeUInt32LE(value % 2 ** 32, at);
  b.writeUInt32LE(Math.floor(value / 2 ** 32), at + 4);
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n));
}

// ---------------------------------------------------------------- file type identifier

/** True when the bytes start with the VHDX signature. */
export function hasFileSignature(head: Uint8Array): boolean {
  return head.length >= 8 && ascii(head, 0, 8) === SIGNATURE_FILE;
}

/** The creator string of the identifier (informational); throws ForeignFormatError without the signature. */
export function parseFileIdentifier(buf: Uint8Array): { creator: string } {
  if (!hasFileSignature(buf)) {
    throw new ForeignFormatError(`not a VHDX file: the first 8 bytes are not "vhdxfile"; open it with the driver of its own format`);
  }
  const b = view(buf);
  const raw = b.subarray(8, Math.min(b.length, 8 + 512)).toString('utf16le');
  const end = raw.indexOf('\0');
  return { creator: end < 0 ? raw : raw.slice(0, end) };
}

/** The 64 KiB identifier: signature and creator (UTF-16LE, at most 256 characters). */
export function serializeFileIdentifier(creator: string): Buffer {
  const out = Buffer.alloc(64 * KiB);
  out.write(SIGNATURE_FILE, 0, 'latin1');
  out.write(creator.slice(0, 255), 8, 'utf16le');
  return out;
}

// ---------------------------------------------------------------- headers

export interface VhdxHeader {
  sequenceNumber: bigint;
  fileWriteGuid: Guid;
  dataWriteGuid: Guid;
  logGuid: Guid;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

export type Parsed<T> = { ok: true; value: T } | { ok: false; reason: string };

/** A header's 4 KiB: signature, CRC-32C (field zeroed), then fields. Returns why it is invalid instead of throwing, because a bad header is normal: the other one is then used. */
export function parseHeader(buf: Uint8Array): Parsed<VhdxHeader> {
  if (buf.length < HEADER_SIZE) return { ok: false, reason: `only ${buf.length} of its ${HEADER_SIZE} bytes are in the file` };
  const b = view(buf);
  if (ascii(b, 0, 4) !== 'head') return { ok: false, reason: `signature is ${JSON.stringify(ascii(b, 0, 4))}, not "head"` };
  const stored = b.readUInt32LE(4);
  const actual = crc32c(b.subarray(0, HEADER_SIZE), 4);
  if (stored !== actual) return { ok: false, reason: `checksum is ${hex32(stored)}, the CRC-32C of its 4 KiB is ${hex32(actual)}` };
  return {
    ok: true,
    value: {
      sequenceNumber: b.readBigUInt64LE(8),
      fileWriteGuid: Uint8Array.from(b.subarray(16, 32)),
      dataWriteGuid: Uint8Array.from(b.subarray(32, 48)),
      logGuid: Uint8Array.from(b.subarray(48, 64)),
      logVersion: b.readUInt16LE(64),
      version: b.readUInt16LE(66),
      logLength: b.readUInt32LE(68),
      logOffset: readU64(b, 72),
    },
  };
}

export function serializeHeader(h: VhdxHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write('head', 0, 'latin1');
  b.writeBigUInt64LE(h.sequenceNumber, 8);
  b.set(h.fileWriteGuid, 16);
  b.set(h.dataWriteGuid, 32);
  b.set(h.logGuid, 48);
  b.writeUInt16LE(h.logVersion, 64);
  b.writeUInt16LE(h.version, 66);
  b.writeUInt32LE(h.logLength, 68);
  writeU64(b, h.logOffset, 72);
  b.writeUInt32LE(crc32c(b), 4);
  return b;
}

/**
 * The current header: the valid one with the higher sequence number (slot 0 on a tie, as
 * MS-VHDX allows either). Throws when neither is valid.
 */
export function chooseHeader(slots: readonly [Parsed<VhdxHeader>, Parsed<VhdxHeader>]): { slot: 0 | 1; header: VhdxHeader } {
  const [a, b] = slots;
  if (a.ok && b.ok) return b.value.sequenceNumber > a.value.sequenceNumber ? { slot: 1, header: b.value } : { slot: 0, header: a.value };
  if (a.ok) return { slot: 0, header: a.value };
  if (b.ok) return { slot: 1, header: b.value };
  throw new CorruptImageError(
    `no valid VHDX header: header 1 (at 64 KiB) ${a.reason}; header 2 (at 128 KiB) ${b.reason}; the file is damaged, restore it from a copy`,
  );
}

/** Refuses header versions we do not know; the log fields are checked where the log is read. */
export function checkHeaderVersion(h: VhdxHeader): void {
  if (h.version !== 1) {
    throw new UnsupportedVersionError(`VHDX header version ${h.version} is not supported (only version 1 exists in MS-VHDX); open it with a newer tool`);
  }
}

// ---------------------------------------------------------------- region tables

export interface RegionEntry {
  guid: Guid;
  fileOffset: number;
  length: number;
  required: boolean;
}

export function parseRegionTable(buf: Uint8Array): Parsed<RegionEntry[]> {
  if (buf.length < REGION_TABLE_SIZE) return { ok: false, reason: `only ${buf.length} of its ${REGION_TABLE_SIZE} bytes are in the file` };
  const b = view(buf);
  if (ascii(b, 0, 4) !== 'regi') return { ok: false, reason: `signature is ${JSON.stringify(ascii(b, 0, 4))}, not "regi"` };
  const stored = b.readUInt32LE(4);
  const actual = crc32c(b.subarray(0, REGION_TABLE_SIZE), 4);
  if (stored !== actual) return { ok: false, reason: `checksum is ${hex32(stored)}, the CRC-32C of its 64 KiB is ${hex32(actual)}` };
  const count = b.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) return { ok: false, reason: `it claims ${count} entries (MS-VHDX allows at most ${MAX_REGION_ENTRIES})` };
  const entries: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 16 + 32 * i;
    entries.push({
      guid: Uint8Array.from(b.subarray(at, at + 16)),
      fileOffset: readU64(b, at + 16),
      length: b.readUInt32LE(at + 24),
      required: (b.readUInt32LE(at + 28) & 1) === 1,
    });
  }
  return { ok: true, value: entries };
}

export function serializeRegionTable(entries: RegionEntry[]): Buffer {
  const b = Buffer.alloc(REGION_TABLE_SIZE);
  b.write('regi', 0, 'latin1');
  b.writeUInt32LE(entries.length, 8);
  entries.forEach((e, i) => {
    const at = 16 + 32 * i;
    b.set(e.guid, at);
    writeU64(b, e.fileOffset, at + 16);
    b.writeUInt32LE(e.length, at + 24);
    b.writeUInt32LE(e.required ? 1 : 0, at + 28);
  });
  b.writeUInt32LE(crc32c(b), 4);
  return b;
}

export interface Regions {
  bat: RegionEntry;
  metadata: RegionEntry;
}

/**
 * The BAT and metadata regions of a valid table, each placed sanely inside a file of
 * `fileSize` bytes. Unknown regions marked Required are refused: MS-VHDX says a reader that
 * does not understand one must not open the file.
 */
export function findRegions(entries: RegionEntry[], fileSize: number): Regions {
  let bat: RegionEntry | undefined;
  let metadata: RegionEntry | undefined;
  for (const e of entries) {
    if (guidEquals(e.guid, REGION_BAT) || guidEquals(e.guid, REGION_METADATA)) {
      const isBat = guidEquals(e.guid, REGION_BAT);
      if (isBat ? bat : metadata) throw new CorruptImageError(`the VHDX region table lists the ${isBat ? 'BAT' : 'metadata'} region twice; the file is damaged`);
      const what = isBat ? 'BAT region' : 'metadata region';
      if (e.fileOffset < HEADER_SECTION_SIZE || e.fileOffset % MiB !== 0 || e.length === 0 || e.length % MiB !== 0) {
        throw new CorruptImageError(
          `the VHDX ${what} is at offset ${e.fileOffset} with length ${e.length}; both must be non-zero multiples of 1 MiB past the first 1 MiB; the file is damaged`,
        );
      }
      if (e.fileOffset + e.length > fileSize) {
        throw new CorruptImageError(
          `the VHDX ${what} (offset ${e.fileOffset}, length ${e.length}) passes the end of the file (${fileSize} bytes): the file is truncated; copy it again`,
        );
      }
      if (isBat) bat = e;
      else metadata = e;
    } else if (e.required) {
      throw new UnsupportedVersionError(`the VHDX file has a required region ${guidToString(e.guid)} this reader does not know; open it with Hyper-V or a newer tool`);
    }
  }
  if (!bat || !metadata) {
    throw new CorruptImageError(`the VHDX region table has no ${bat ? 'metadata' : 'BAT'} region; the file is damaged`);
  }
  const overlap = bat.fileOffset < metadata.fileOffset + metadata.length && metadata.fileOffset < bat.fileOffset + bat.length;
  if (overlap) throw new CorruptImageError(`the VHDX BAT region (offset ${bat.fileOffset}) overlaps the metadata region (offset ${metadata.fileOffset}); the file is damaged`);
  return { bat, metadata };
}

// ---------------------------------------------------------------- metadata

export interface MetadataEntry {
  itemId: Guid;
  /** Relative to the start of the metadata region. */
  offset: number;
  length: number;
  isUser: boolean;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

export function parseMetadataTable(buf: Uint8Array, regionLength: number): MetadataEntry[] {
  const b = view(buf);
  if (b.length < METADATA_TABLE_SIZE || ascii(b, 0, 8) !== 'metadata') {
    throw new CorruptImageError(`the VHDX metadata table does not start with "metadata"; the file is damaged`);
  }
  const count = b.readUInt16LE(10);
  if (count > MAX_METADATA_ENTRIES) throw new CorruptImageError(`the VHDX metadata table claims ${count} entries (at most ${MAX_METADATA_ENTRIES}); the file is damaged`);
  const entries: MetadataEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 32 + 32 * i;
    const flags = b.readUInt32LE(at + 24);
    const e: MetadataEntry = {
      itemId: Uint8Array.from(b.subarray(at, at + 16)),
      offset: b.readUInt32LE(at + 16),
      length: b.readUInt32LE(at + 20),
      isUser: (flags & 1) !== 0,
      isVirtualDisk: (flags & 2) !== 0,
      isRequired: (flags & 4) !== 0,
    };
    if (e.length > 0 && (e.offset < METADATA_TABLE_SIZE || e.offset + e.length > regionLength)) {
      throw new CorruptImageError(
        `VHDX metadata item ${guidToString(e.itemId)} lies at ${e.offset}..${e.offset + e.length} of the metadata region, outside 64 KiB..${regionLength}; the file is damaged`,
      );
    }
    entries.push(e);
  }
  return entries;
}

export interface VhdxMetadata {
  blockSize: number;
  /** Set on fixed disks: every payload block is allocated and stays so. */
  leaveBlocksAllocated: boolean;
  hasParent: boolean;
  virtualSize: number;
  page83: Guid;
  logicalSectorSize: number;
  physicalSectorSize: number;
}

/** Which entries the reader must fetch bytes for (the known ones, each of bounded length). */
export function knownItemEntries(entries: MetadataEntry[]): MetadataEntry[] {
  const out: MetadataEntry[] = [];
  for (const e of entries) {
    const known = KNOWN_ITEMS.find((k) => guidEquals(k.guid, e.itemId));
    if (!known) {
      if (e.isRequired) {
        throw new UnsupportedVersionError(`the VHDX file has a required metadata item ${guidToString(e.itemId)} this reader does not know; open it with Hyper-V or a newer tool`);
      }
      continue;
    }
    if (out.some((o) => guidEquals(o.itemId, e.itemId))) throw new CorruptImageError(`the VHDX metadata table lists ${known.name} twice; the file is damaged`);
    if (known.length > 0 && e.length !== known.length) {
      throw new CorruptImageError(`the VHDX ${known.name} item is ${e.length} bytes long, not ${known.length}; the file is damaged`);
    }
    // The parent locator's contents are not read (differencing disks are refused), so its length is not fetched.
    if (known.length > 0) out.push(e);
  }
  return out;
}

/** Decodes and range-checks the items fetched for `knownItemEntries`. */
export function decodeMetadata(items: { entry: MetadataEntry; bytes: Uint8Array }[]): VhdxMetadata {
  const get = (guid: Guid, name: string): Buffer => {
    const it = items.find((i) => guidEquals(i.entry.itemId, guid));
    if (!it) throw new CorruptImageError(`the VHDX metadata has no ${name} item; the file is damaged`);
    return view(it.bytes);
  };
  const fp = get(ITEM_FILE_PARAMETERS, 'File Parameters');
  const blockSize = fp.readUInt32LE(0);
  const bits = fp.readUInt32LE(4);
  const virtualSize = readU64(get(ITEM_VIRTUAL_DISK_SIZE, 'Virtual Disk Size'), 0);
  const logicalSectorSize = get(ITEM_LOGICAL_SECTOR_SIZE, 'Logical Sector Size').readUInt32LE(0);
  const physicalSectorSize = get(ITEM_PHYSICAL_SECTOR_SIZE, 'Physical Sector Size').readUInt32LE(0);
  const p83 = items.find((i) => guidEquals(i.entry.itemId, ITEM_PAGE83));
  if (!isPowerOfTwo(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE) {
    throw new CorruptImageError(`the VHDX block size is ${blockSize} bytes; MS-VHDX requires a power of two from 1 MiB to 256 MiB; the file is damaged`);
  }
  if (logicalSectorSize !== 512 && logicalSectorSize !== 4096) {
    throw new CorruptImageError(`the VHDX logical sector size is ${logicalSectorSize}; only 512 and 4096 exist; the file is damaged`);
  }
  if (physicalSectorSize !== 512 && physicalSectorSize !== 4096) {
    throw new CorruptImageError(`the VHDX physical sector size is ${physicalSectorSize}; only 512 and 4096 exist; the file is damaged`);
  }
  if (virtualSize === 0 || virtualSize > MAX_VIRTUAL_SIZE || virtualSize % logicalSectorSize !== 0) {
    throw new CorruptImageError(
      `the VHDX virtual size is ${virtualSize} bytes; it must be a non-zero multiple of the ${logicalSectorSize}-byte logical sector, at most 64 TiB; the file is damaged`,
    );
  }
  return {
    blockSize,
    leaveBlocksAllocated: (bits & 1) !== 0,
    hasParent: (bits & 2) !== 0,
    virtualSize,
    page83: p83 ? Uint8Array.from(p83.bytes) : new Uint8Array(16),
    logicalSectorSize,
    physicalSectorSize,
  };
}

/**
 * The metadata region's first bytes: the 64 KiB table, then the items packed from 64 KiB,
 * with the flags qemu and Hyper-V write (File Parameters IsRequired; the others
 * IsVirtualDisk + IsRequired).
 */
export function serializeMetadata(m: VhdxMetadata): Buffer {
  const fp = Buffer.alloc(8);
  fp.writeUInt32LE(m.blockSize, 0);
  fp.writeUInt32LE((m.leaveBlocksAllocated ? 1 : 0) + (m.hasParent ? 2 : 0), 4);
  const vs = Buffer.alloc(8);
  writeU64(vs, m.virtualSize, 0);
  const lss = Buffer.alloc(4);
  lss.writeUInt32LE(m.logicalSectorSize, 0);
  const pss = Buffer.alloc(4);
  pss.writeUInt32LE(m.physicalSectorSize, 0);
  const items: [Guid, Uint8Array, number][] = [
    [ITEM_FILE_PARAMETERS, fp, 4],
    [ITEM_VIRTUAL_DISK_SIZE, vs, 6],
    [ITEM_PAGE83, m.page83, 6],
    [ITEM_LOGICAL_SECTOR_SIZE, lss, 6],
    [ITEM_PHYSICAL_SECTOR_SIZE, pss, 6],
  ];
  const total = items.reduce((n, [, p]) => n + p.length, 0);
  const b = Buffer.alloc(METADATA_TABLE_SIZE + total);
  b.write('metadata', 0, 'latin1');
  b.writeUInt16LE(items.length, 10);
  let offset = METADATA_TABLE_SIZE;
  items.forEach(([guid, payload, flags], i) => {
    const at = 32 + 32 * i;
    b.set(guid, at);
    b.writeUInt32LE(offset, at + 16);
    b.writeUInt32LE(payload.length, at + 20);
    b.writeUInt32LE(flags, at + 24);
    b.set(payload, offset);
    offset += payload.length;
  });
  return b;
}

// ---------------------------------------------------------------- BAT

/** Payload block states (BAT entry bits 0-2). */
export const PAYLOAD_NOT_PRESENT = 0;
export const PAYLOAD_UNDEFINED = 1;
export const PAYLOAD_ZERO = 2;
export const PAYLOAD_UNMAPPED = 3;
export const PAYLOAD_FULLY_PRESENT = 6;
export const PAYLOAD_PARTIALLY_PRESENT = 7;
/** Sector-bitmap block states. */
export const SB_NOT_PRESENT = 0;
export const SB_PRESENT = 6;

export const BAT_ENTRY_SIZE = 8;

/**
 * Payload blocks per sector-bitmap block: one bitmap block covers 2^23 logical sectors, so
 * 4 GiB of disk with 512-byte sectors (ratio 128 for 32 MiB blocks, 4096 for 1 MiB blocks).
 */
export function chunkRatio(logicalSectorSize: number, blockSize: number): number {
  return (2 ** 23 * logicalSectorSize) / blockSize;
}

/** BAT entries of a disk: payload entries with one sector-bitmap entry after every `ratio` of them. */
export function batEntryCount(payloadBlocks: number, ratio: number, differencing: boolean): number {
  if (differencing) return Math.ceil(payloadBlocks / ratio) * (ratio + 1);
  return payloadBlocks + Math.floor((payloadBlocks - 1) / ratio);
}

/** Where payload block `block` sits in the BAT. */
export function payloadBatIndex(block: number, ratio: number): number {
  return block + Math.floor(block / ratio);
}

/** True for the indices that hold sector-bitmap entries: every (ratio+1)-th. */
export function isSectorBitmapIndex(index: number, ratio: number): boolean {
  return (index + 1) % (ratio + 1) === 0;
}

export function batState(bat: Uint8Array, index: number): number {
  return bat[index * 8] & 7;
}

/** The entry's file offset in bytes (its upper 44 bits count MiB). */
export function batFileOffset(bat: Uint8Array, index: number): number {
  const b = view(bat);
  const lo = b.readUInt32LE(index * 8);
  const hi = b.readUInt32LE(index * 8 + 4);
  return (hi * 4096 + Math.floor(lo / MiB)) * MiB;
}

/** Bits 3-19 are reserved and must be zero. */
export function batReservedBits(bat: Uint8Array, index: number): number {
  return Math.floor(view(bat).readUInt32LE(index * 8) / 8) % 2 ** 17;
}

export function setBatEntry(bat: Uint8Array, index: number, state: number, fileOffset: number): void {
  if (fileOffset % MiB !== 0) throw new RangeError(`BAT offset ${fileOffset} is not a multiple of 1 MiB`);
  const mb = fileOffset / MiB;
  const b = view(bat);
  b.writeUInt32LE((mb % 4096) * MiB + state, index * 8);
  b.writeUInt32LE(Math.floor(mb / 4096), index * 8 + 4);
}

// ---------------------------------------------------------------- log

export type LogDescriptor =
  | { kind: 'data'; fileOffset: number; sector: Uint8Array }
  | { kind: 'zero'; fileOffset: number; length: number };

export interface LogEntry {
  /** Where the entry starts in the log (a multiple of 4 KiB). */
  offset: number;
  length: number;
  sequenceNumber: bigint;
  /** Offset in the log of the oldest entry of the sequence this one closes. */
  tail: number;
  flushedFileOffset: number;
  lastFileOffset: number;
  descriptors: LogDescriptor[];
}

const LOG_HEADER_SIZE = 64;
const LOG_DESCRIPTOR_SIZE = 32;
const LOG_DATA_PAYLOAD = 4084;

/** Sectors that hold the 64-byte entry header and `count` 32-byte descriptors. */
export function logDescriptorSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}

/** The bytes of a log entry starting at `offset`, wrapping around the circular log. */
function circular(log: Uint8Array, offset: number, length: number): Buffer {
  if (offset + length <= log.length) return view(log).subarray(offset, offset + length);
  const out = Buffer.alloc(length);
  const first = log.length - offset;
  out.set(log.subarray(offset), 0);
  out.set(log.subarray(0, length - first), first);
  return out;
}

/**
 * The valid log entry at `offset` of the log, or null. Valid means MS-VHDX's rules: signature,
 * a length in whole 4 KiB sectors no longer than the log, a non-zero sequence number, the
 * file's LogGuid, a CRC-32C over the whole entry, descriptors and data sectors that carry the
 * entry's sequence number, and 4 KiB-aligned target offsets.
 */
export function parseLogEntry(log: Uint8Array, offset: number, logGuid: Guid): LogEntry | null {
  if (offset % LOG_SECTOR !== 0 || offset + LOG_HEADER_SIZE > log.length) return null;
  const h = view(log).subarray(offset, offset + LOG_HEADER_SIZE);
  if (ascii(h, 0, 4) !== 'loge') return null;
  const length = h.readUInt32LE(8);
  const tail = h.readUInt32LE(12);
  const sequenceNumber = h.readBigUInt64LE(16);
  const count = h.readUInt32LE(24);
  if (length === 0 || length % LOG_SECTOR !== 0 || length > log.length) return null;
  if (sequenceNumber === 0n || tail % LOG_SECTOR !== 0 || tail >= log.length) return null;
  if (!guidEquals(h.subarray(32, 48), logGuid)) return null;
  const descSectors = logDescriptorSectors(count);
  if (descSectors > length / LOG_SECTOR) return null;
  const entry = circular(log, offset, length);
  if (entry.readUInt32LE(4) !== crc32c(entry, 4)) return null;
  const flushedFileOffset = readU64(entry, 48);
  const lastFileOffset = readU64(entry, 56);
  if (flushedFileOffset > Number.MAX_SAFE_INTEGER || lastFileOffset > Number.MAX_SAFE_INTEGER) return null;
  const descriptors: LogDescriptor[] = [];
  let dataSector = descSectors;
  for (let i = 0; i < count; i++) {
    const at = LOG_HEADER_SIZE + LOG_DESCRIPTOR_SIZE * i;
    const sig = ascii(entry, at, 4);
    const fileOffset = readU64(entry, at + 16);
    if (entry.readBigUInt64LE(at + 24) !== sequenceNumber || fileOffset % LOG_SECTOR !== 0 || fileOffset > Number.MAX_SAFE_INTEGER) return null;
    if (sig === 'zero') {
      const zeroLength = readU64(entry, at + 8);
      if (zeroLength % LOG_SECTOR !== 0 || fileOffset + zeroLength > Number.MAX_SAFE_INTEGER) return null;
      descriptors.push({ kind: 'zero', fileOffset, length: zeroLength });
    } else if (sig === 'desc') {
      if ((dataSector + 1) * LOG_SECTOR > length) return null;
      const d = entry.subarray(dataSector * LOG_SECTOR, (dataSector + 1) * LOG_SECTOR);
      const seq = (BigInt(d.readUInt32LE(4)) << 32n) + BigInt(d.readUInt32LE(4092));
      if (ascii(d, 0, 4) !== 'data' || seq !== sequenceNumber) return null;
      // The 4 KiB written to the file: 8 leading bytes from the descriptor, 4084 from the data
      // sector, 4 trailing bytes from the descriptor (so the sector's own signature fields fit).
      const sector = Buffer.alloc(LOG_SECTOR);
      entry.copy(sector, 0, at + 8, at + 16);
      d.copy(sector, 8, 8, 8 + LOG_DATA_PAYLOAD);
      entry.copy(sector, 8 + LOG_DATA_PAYLOAD, at + 4, at + 8);
      descriptors.push({ kind: 'data', fileOffset, sector });
      dataSector++;
    } else {
      return null;
    }
  }
  return { offset, length, sequenceNumber, tail, flushedFileOffset, lastFileOffset, descriptors };
}

/**
 * The active sequence of a log, oldest entry first, or [] when nothing is to be replayed.
 * Every 4 KiB position is tried as an entry; the head is the valid entry with the highest
 * sequence number whose Tail leads, entry by entry with consecutive sequence numbers, back to
 * it. Valid entries without any such chain mean a log we cannot trust: refused.
 */
export function findActiveLogSequence(log: Uint8Array, logGuid: Guid): LogEntry[] {
  const byOffset = new Map<number, LogEntry>();
  for (let off = 0; off < log.length; off += LOG_SECTOR) {
    const e = parseLogEntry(log, off, logGuid);
    if (e) byOffset.set(off, e);
  }
  if (byOffset.size === 0) return [];
  const heads = [...byOffset.values()].sort((a, b) => (a.sequenceNumber < b.sequenceNumber ? 1 : a.sequenceNumber > b.sequenceNumber ? -1 : 0));
  for (const head of heads) {
    const chain: LogEntry[] = [];
    let cur = byOffset.get(head.tail);
    while (cur && chain.length <= byOffset.size) {
      chain.push(cur);
      if (cur === head) return chain;
      const next = byOffset.get((cur.offset + cur.length) % log.length);
      if (!next || next.sequenceNumber !== cur.sequenceNumber + 1n) break;
      cur = next;
    }
  }
  throw new CorruptImageError(
    `the VHDX log holds ${byOffset.size} valid entries but no complete sequence to replay; the file was damaged while being written; repair it with Hyper-V or "qemu-img check -r all" on a copy`,
  );
}

export interface LogEntryInput {
  sequenceNumber: bigint;
  tail: number;
  logGuid: Guid;
  flushedFileOffset: number;
  lastFileOffset: number;
  descriptors: LogDescriptor[];
}

/** A log entry's bytes (header, descriptors, data sectors, CRC-32C over all of it). */
export function serializeLogEntry(e: LogEntryInput): Buffer {
  const descSectors = logDescriptorSectors(e.descriptors.length);
  const dataCount = e.descriptors.filter((d) => d.kind === 'data').length;
  const length = (descSectors + dataCount) * LOG_SECTOR;
  const b = Buffer.alloc(length);
  b.write('loge', 0, 'latin1');
  b.writeUInt32LE(length, 8);
  b.writeUInt32LE(e.tail, 12);
  b.writeBigUInt64LE(e.sequenceNumber, 16);
  b.writeUInt32LE(e.descriptors.length, 24);
  b.set(e.logGuid, 32);
  writeU64(b, e.flushedFileOffset, 48);
  writeU64(b, e.lastFileOffset, 56);
  let dataSector = descSectors;
  e.descriptors.forEach((d, i) => {
    const at = LOG_HEADER_SIZE + LOG_DESCRIPTOR_SIZE * i;
    if (d.kind === 'zero') {
      b.write('zero', at, 'latin1');
      writeU64(b, d.length, at + 8);
    } else {
      b.write('desc', at, 'latin1');
      b.set(d.sector.subarray(8 + LOG_DATA_PAYLOAD, LOG_SECTOR), at + 4);
      b.set(d.sector.subarray(0, 8), at + 8);
      const s = dataSector * LOG_SECTOR;
      b.write('data', s, 'latin1');
      b.writeUInt32LE(Number(e.sequenceNumber >> 32n), s + 4);
      b.set(d.sector.subarray(8, 8 + LOG_DATA_PAYLOAD), s + 8);
      b.writeUInt32LE(Number(e.sequenceNumber & 0xffffffffn), s + 4092);
      dataSector++;
    }
    writeU64(b, d.fileOffset, at + 16);
    b.writeBigUInt64LE(e.sequenceNumber, at + 24);
  });
  b.writeUInt32LE(crc32c(b), 4);
  return b;
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
