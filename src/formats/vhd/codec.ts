/**
 * VHD codec: the hard disk footer, the dynamic disk header with its parent locators, the
 * block allocation table (BAT) and the CHS geometry, as pure functions over buffers (no I/O).
 *
 * All integers are big-endian. 64-bit fields are read as BigInt and turned into numbers; a
 * value above 2^53 becomes an imprecise but still huge number, which the validators then
 * refuse, so no caller ever sees a wrapped value. Offsets are handled with arithmetic only
 * (no `|`, `&`, `>>` on byte offsets: they wrap at 2^31).
 */
import { alignUp, ceilDiv, SECTOR } from '../bytes.js';

export const FOOTER_SIZE = 512;
export const HEADER_SIZE = 1024;
export const FOOTER_COOKIE = 'conectix';
export const HEADER_COOKIE = 'cxsparse';

export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;

/** The BAT's mark for a block that is not in this file. */
export const UNALLOCATED = 0xffffffff;

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** qemu's VHD_MAX_SECTORS (0xff000000) and Hyper-V's documented VHD maximum: 2040 GiB. */
export const MAX_VHD_SIZE = 2040 * GiB;
export const DEFAULT_BLOCK_SIZE = 2 * MiB;
/**
 * Block sizes we read and write. Real disks use 512 KiB (Hyper-V differencing) or 2 MiB;
 * 64 KiB as the floor keeps a 2040 GiB disk's BAT at 128 MiB, a size we may hold in memory.
 */
export const MIN_BLOCK_SIZE = 64 * 1024;
export const MAX_BLOCK_SIZE = 256 * MiB;

/** Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC. */
export const VHD_EPOCH_UNIX = 946_684_800;

/** The largest geometry, which says "this disk is bigger than CHS can describe". */
export const MAX_CHS_SECTORS = 65535 * 16 * 255;

/** The feature field's reserved bit, which the spec says must always be set. */
export const FEATURE_RESERVED = 0x00000002;
export const VERSION_1_0 = 0x00010000;

/**
 * Creator applications for which qemu takes the size from current_size rather than from
 * the CHS geometry (block/vpc.c, 7.2). For any other creator qemu computes the size from
 * CHS and so cuts off the tail of a disk whose size is not CHS-exact.
 */
export const CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

export interface VhdFooter {
  features: number;
  formatVersion: number;
  /** Offset of the dynamic disk header; null when all 64 bits are set (fixed disks). */
  dataOffset: number | null;
  /** Seconds since 2000-01-01 00:00:00 UTC. */
  timestamp: number;
  /** Four characters, e.g. "win ". */
  creatorApp: string;
  creatorVersion: number;
  /** Four characters, e.g. "Wi2k". */
  creatorHostOs: string;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uniqueId: Uint8Array;
  savedState: number;
}

export interface ParentLocator {
  /** Four characters: "W2ru", "W2ku", "MacX", ... ; "" for an unused entry. */
  platformCode: string;
  /** The space reserved for the data: sectors per the spec, bytes in some writers. */
  dataSpace: number;
  /** Bytes of path data. */
  dataLength: number;
  dataOffset: number;
}

export interface VhdHeader {
  /** Next structure; null when all 64 bits are set (always, today). */
  dataOffset: number | null;
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUniqueId: Uint8Array;
  parentTimestamp: number;
  /** The parent's file name (UTF-16BE in the file). */
  parentName: string;
  /** Always 8 entries; unused ones have platformCode "". */
  locators: ParentLocator[];
}

function view(buf: Uint8Array): Buffer {
  return Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
}

function readU64(b: Buffer, at: number): number {
  return Number(b.readBigUInt64BE(at));
}

function readOffset(b: Buffer, at: number): number | null {
  const v = b.readBigUInt64BE(at);
  return v === 0xffffffffffffffffn ? null : Number(v);
}

function writeOffset(b: Buffer, at: number, v: number | null): void {
  b.writeBigUInt64BE(v === null ? 0xffffffffffffffffn : BigInt(v), at);
}

/** The four characters of a FourCC field, NULs kept (qemu's XenServer creator is "tap\0"). */
function fourcc(b: Buffer, at: number): string {
  return b.toString('latin1', at, at + 4);
}

/** One's complement of the byte sum, the checksum field (4 bytes at `field`) counted as zero. */
export function vhdChecksum(buf: Uint8Array, field: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i < field || i >= field + 4) sum += buf[i]!;
  }
  return ~sum >>> 0;
}

export function hasFooterCookie(buf: Uint8Array): boolean {
  return buf.length >= 8 && view(buf).toString('latin1', 0, 8) === FOOTER_COOKIE;
}

export function decodeFooter(buf: Uint8Array): VhdFooter {
  if (buf.length !== FOOTER_SIZE) throw new RangeError(`a VHD footer is ${FOOTER_SIZE} bytes, not ${buf.length}`);
  const b = view(buf);
  return {
    features: b.readUInt32BE(8),
    formatVersion: b.readUInt32BE(12),
    dataOffset: readOffset(b, 16),
    timestamp: b.readUInt32BE(24),
    creatorApp: fourcc(b, 28),
    creatorVersion: b.readUInt32BE(32),
    creatorHostOs: fourcc(b, 36),
    originalSize: readU64(b, 40),
    currentSize: readU64(b, 48),
    geometry: { cylinders: b.readUInt16BE(56), heads: b[58]!, sectorsPerTrack: b[59]! },
    diskType: b.readUInt32BE(60),
    checksum: b.readUInt32BE(64),
    uniqueId: Uint8Array.from(b.subarray(68, 84)),
    savedState: b[84]!,
  };
}

/** The 512 footer bytes, checksum computed (the `checksum` field of `f` is ignored). */
export function encodeFooter(f: VhdFooter): Buffer {
  const b = Buffer.alloc(FOOTER_SIZE);
  b.write(FOOTER_COOKIE, 0, 'latin1');
  b.writeUInt32BE(f.features, 8);
  b.writeUInt32BE(f.formatVersion, 12);
  writeOffset(b, 16, f.dataOffset);
  b.writeUInt32BE(f.timestamp, 24);
  b.write(f.creatorApp.padEnd(4, ' ').slice(0, 4), 28, 'latin1');
  b.writeUInt32BE(f.creatorVersion, 32);
  b.write(f.creatorHostOs.padEnd(4, ' ').slice(0, 4), 36, 'latin1');
  b.writeBigUInt64BE(BigInt(f.originalSize), 40);
  b.writeBigUInt64BE(BigInt(f.currentSize), 48);
  b.writeUInt16BE(f.geometry.cylinders, 56);
  b[58] = f.geometry.heads;
  b[59] = f.geometry.sectorsPerTrack;
  b.writeUInt32BE(f.diskType, 60);
  b.set(f.uniqueId.subarray(0, 16), 68);
  b[84] = f.savedState;
  b.writeUInt32BE(vhdChecksum(b, 64), 64);
  return b;
}

/** Why these 512 bytes are not a usable footer (cookie, checksum), or null when they are. */
export function footerDefect(buf: Uint8Array): string | null {
  if (buf.length !== FOOTER_SIZE) return `it is ${buf.length} bytes, not ${FOOTER_SIZE}`;
  if (!hasFooterCookie(buf)) return `it does not start with the cookie "${FOOTER_COOKIE}"`;
  const stored = view(buf).readUInt32BE(64);
  const computed = vhdChecksum(buf, 64);
  if (stored !== computed) return `its checksum is 0x${hex32(stored)} but its bytes sum to 0x${hex32(computed)}`;
  return null;
}

export function decodeHeader(buf: Uint8Array): VhdHeader {
  if (buf.length !== HEADER_SIZE) throw new RangeError(`a VHD dynamic header is ${HEADER_SIZE} bytes, not ${buf.length}`);
  const b = view(buf);
  const locators: ParentLocator[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 576 + i * 24;
    const code = b.readUInt32BE(at);
    locators.push({
      platformCode: code === 0 ? '' : fourcc(b, at),
      dataSpace: b.readUInt32BE(at + 4),
      dataLength: b.readUInt32BE(at + 8),
      dataOffset: readU64(b, at + 16),
    });
  }
  return {
    dataOffset: readOffset(b, 8),
    tableOffset: readU64(b, 16),
    headerVersion: b.readUInt32BE(24),
    maxTableEntries: b.readUInt32BE(28),
    blockSize: b.readUInt32BE(32),
    checksum: b.readUInt32BE(36),
    parentUniqueId: Uint8Array.from(b.subarray(40, 56)),
    parentTimestamp: b.readUInt32BE(56),
    parentName: decodeUtf16be(b.subarray(64, 576)),
    locators,
  };
}

/** The 1024 header bytes, checksum computed. Locators beyond 8 are an error of the caller. */
export function encodeHeader(h: VhdHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write(HEADER_COOKIE, 0, 'latin1');
  writeOffset(b, 8, h.dataOffset);
  b.writeBigUInt64BE(BigInt(h.tableOffset), 16);
  b.writeUInt32BE(h.headerVersion, 24);
  b.writeUInt32BE(h.maxTableEntries, 28);
  b.writeUInt32BE(h.blockSize, 32);
  b.set(h.parentUniqueId.subarray(0, 16), 40);
  b.writeUInt32BE(h.parentTimestamp, 56);
  const name = encodeUtf16be(h.parentName);
  if (name.length > 512) throw new RangeError(`a VHD parent name holds 256 UTF-16 units; "${h.parentName}" needs ${name.length / 2}`);
  b.set(name, 64);
  if (h.locators.length > 8) throw new RangeError(`a VHD header holds 8 parent locators, not ${h.locators.length}`);
  h.locators.forEach((l, i) => {
    const at = 576 + i * 24;
    if (l.platformCode === '') return;
    b.write(l.platformCode.padEnd(4, ' ').slice(0, 4), at, 'latin1');
    b.writeUInt32BE(l.dataSpace, at + 4);
    b.writeUInt32BE(l.dataLength, at + 8);
    b.writeBigUInt64BE(BigInt(l.dataOffset), at + 16);
  });
  b.writeUInt32BE(vhdChecksum(b, 36), 36);
  return b;
}

/** Why these 1024 bytes are not a usable dynamic header (cookie, checksum), or null. */
export function headerDefect(buf: Uint8Array): string | null {
  if (view(buf).toString('latin1', 0, 8) !== HEADER_COOKIE) return `it does not start with the cookie "${HEADER_COOKIE}"`;
  const stored = view(buf).readUInt32BE(36);
  const computed = vhdChecksum(buf, 36);
  if (stored !== computed) return `its checksum is 0x${hex32(stored)} but its bytes sum to 0x${hex32(computed)}`;
  return null;
}

export function decodeUtf16be(buf: Uint8Array): string {
  const swapped = Buffer.from(buf.subarray(0, buf.length - (buf.length % 2))).swap16();
  const s = swapped.toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

export function encodeUtf16be(s: string): Buffer {
  return Buffer.from(s, 'utf16le').swap16();
}

/**
 * The path a parent locator's platform data holds: UTF-16LE for the Windows codes W2ru
 * (relative, ".\parent.vhd") and W2ku (absolute); a UTF-8 file URL for MacX; the deprecated
 * Wi2r/Wi2k as single-byte text. Null for codes that do not hold a path (Mac's alias record).
 */
export function decodeLocatorPath(code: string, data: Uint8Array): string | null {
  const b = view(data);
  let s: string;
  if (code === 'W2ru' || code === 'W2ku') s = b.subarray(0, b.length - (b.length % 2)).toString('utf16le');
  else if (code === 'MacX') s = b.toString('utf8');
  else if (code === 'Wi2r' || code === 'Wi2k') s = b.toString('latin1');
  else return null;
  const nul = s.indexOf('\0');
  if (nul >= 0) s = s.slice(0, nul);
  return s === '' ? null : s;
}

export function encodeLocatorPath(code: 'W2ru' | 'W2ku' | 'MacX', path: string): Buffer {
  return code === 'MacX' ? Buffer.from(path, 'utf8') : Buffer.from(path, 'utf16le');
}

/**
 * The CHS geometry of the VHD spec's appendix (and qemu's calculate_geometry): every
 * division truncates, and sizes above 65535×16×255 sectors are pinned at that maximum.
 */
export function chsGeometry(size: number): Geometry {
  const totalSectors = Math.min(Math.floor(size / SECTOR), MAX_CHS_SECTORS);
  let sectorsPerTrack: number;
  let heads: number;
  let cylinderTimesHeads: number;
  if (totalSectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    heads = Math.max(ceilDiv(cylinderTimesHeads, 1024), 4);
    if (cylinderTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
    if (cylinderTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylinderTimesHeads / heads), heads, sectorsPerTrack };
}

/** Bytes the geometry describes. */
export function chsBytes(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack * SECTOR;
}

export function isMaxGeometry(g: Geometry): boolean {
  return g.cylinders === 65535 && g.heads === 16 && g.sectorsPerTrack === 255;
}

/** The size qemu 7.2 sees for this footer: current_size for known creators or maximum CHS, else CHS. */
export function qemuSeenSize(f: VhdFooter): number {
  if (CURRENT_SIZE_CREATORS.includes(f.creatorApp) || isMaxGeometry(f.geometry)) return f.currentSize;
  return chsBytes(f.geometry);
}

/** Bytes of a block's sector bitmap: one bit per sector, padded to whole sectors. */
export function bitmapBytes(blockSize: number): number {
  return alignUp(ceilDiv(blockSize / SECTOR, 8), SECTOR);
}

/** Bytes the BAT occupies in the file: 4 per entry, padded to whole sectors. */
export function batBytes(maxTableEntries: number): number {
  return alignUp(maxTableEntries * 4, SECTOR);
}

/** The first `count` BAT entries (sector numbers, UNALLOCATED for none) of the table bytes. */
export function decodeBat(buf: Uint8Array, count: number): Uint32Array {
  if (buf.length < count * 4) throw new RangeError(`a BAT of ${count} entries needs ${count * 4} bytes, not ${buf.length}`);
  const b = view(buf);
  const bat = new Uint32Array(count);
  for (let i = 0; i < count; i++) bat[i] = b.readUInt32BE(i * 4);
  return bat;
}

/** The BAT's bytes in the file: big-endian entries, padded with 0xFF to whole sectors. */
export function encodeBat(bat: Uint32Array, maxTableEntries = bat.length): Buffer {
  const b = Buffer.alloc(batBytes(maxTableEntries), 0xff);
  for (let i = 0; i < bat.length; i++) b.writeUInt32BE(bat[i]!, i * 4);
  return b;
}

/** Is sector `i` of a block marked in its bitmap? MSB-first: bit 7 of byte 0 is sector 0. */
export function bitmapHas(bitmap: Uint8Array, i: number): boolean {
  return (bitmap[Math.floor(i / 8)]! & (0x80 >> (i % 8))) !== 0;
}

export function bitmapSet(bitmap: Uint8Array, i: number): void {
  bitmap[Math.floor(i / 8)]! |= 0x80 >> (i % 8);
}

/** Unix seconds to VHD seconds (since 2000), clamped to the field's 32 bits. */
export function vhdTimestamp(unixSeconds: number): number {
  return Math.min(0xffffffff, Math.max(0, Math.floor(unixSeconds - VHD_EPOCH_UNIX)));
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && Math.log2(n) % 1 === 0;
}

export function hex32(n: number): string {
  return n.toString(16).padStart(8, '0');
}

export function uuidText(id: Uint8Array): string {
  const h = Buffer.from(id).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
