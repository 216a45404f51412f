/**
 * The imagekeep image format, version 1: pure encode/decode of its three structures.
 * docs/format.md is the normative description; this module is its executable form.
 *
 *   [header 4096 B][block records, in index order][index][trailer 64 B]
 *
 * The header is fully known before the first block is read, so an image is written in
 * one sequential pass; the index and trailer come last, so a file cut short has no valid
 * trailer and is detected. Record offsets are not stored: they are the prefix sums of
 * the stored lengths, which keeps an index entry at 32 bytes.
 */
import { createHash } from 'node:crypto';
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../../formats/errors.js';

export const MAGIC = Buffer.from('IMGKEEP\x1a', 'latin1');
export const FORMAT_VERSION = 1;
export const HEADER_SIZE = 4096;
export const TRAILER_SIZE = 64;
export const INDEX_HEADER_SIZE = 32;
export const INDEX_ENTRY_SIZE = 32;
export const DIGEST_SIZE = 16;
const TRAILER_MAGIC = Buffer.from('IKTRAIL1', 'latin1');
const INDEX_MAGIC = Buffer.from('IKINDEX1', 'latin1');
/** Digest bytes are copied as words read in the platform's byte order, so they land unchanged. */
const NATIVE_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const HEADER_CHECKSUM_AT = HEADER_SIZE - 32;
const VOLUME_NAME_BYTES = 64;

/** Collapse levels as suffix bits; a raw incremental has none, a base has none. */
export const LEVEL_BITS = { cd: 1, cw: 2, cm: 4, cr: 8 } as const;

export type Compression = 'none' | 'zstd';
export type SourceKind = 'disk' | 'volume';

export interface KdfParams {
  /** scrypt cost: N = 2^log2N */
  log2N: number;
  r: number;
  p: number;
  salt: Buffer; // 32 bytes
}

export interface EncryptionInfo {
  kdf: KdfParams;
  /** nonce(12) + AES-256-GCM(KEK, data key)(32) + tag(16) */
  wrappedKey: Buffer;
}

export interface ImageHeader {
  version: number;
  chainId: Buffer; // 16
  volume: string;
  baseNumber: number;
  /** first..last incremental covered; 0..0 for a base */
  first: number;
  last: number;
  /** collapse suffix bits (LEVEL_BITS); 0 for a base or a raw incremental */
  levelBits: number;
  parentPointId: Buffer; // 16, zero for a base
  endPointId: Buffer; // 16
  /** capture time of the end point, ms since the epoch: the business day follows it */
  pointTime: number;
  /** when this file was written, ms since the epoch */
  createdTime: number;
  sourceKind: SourceKind;
  forensic: boolean;
  virtualSize: number;
  sectorSize: number;
  blockSize: number;
  compression: Compression;
  compressionLevel: number;
  encryption: EncryptionInfo | null;
}

const FLAG_ENCRYPTED = 1;
const FLAG_FORENSIC = 2;
const FLAG_VOLUME = 4;

export function encodeHeader(h: ImageHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  MAGIC.copy(b, 0);
  b.writeUInt16LE(FORMAT_VERSION, 8);
  b.writeUInt16LE(HEADER_SIZE, 10);
  b.writeUInt32LE((h.encryption ? FLAG_ENCRYPTED : 0) | (h.forensic ? FLAG_FORENSIC : 0) | (h.sourceKind === 'volume' ? FLAG_VOLUME : 0), 12);
  h.chainId.copy(b, 16, 0, 16);
  h.parentPointId.copy(b, 32, 0, 16);
  h.endPointId.copy(b, 48, 0, 16);
  b.writeDoubleLE(h.createdTime, 64);
  b.writeDoubleLE(h.pointTime, 72);
  b.writeDoubleLE(h.virtualSize, 80);
  b.writeUInt32LE(h.sectorSize, 88);
  b.writeUInt32LE(h.blockSize, 92);
  b.writeUInt32LE(h.baseNumber, 96);
  b.writeUInt32LE(h.first, 100);
  b.writeUInt32LE(h.last, 104);
  b.writeUInt8(h.levelBits, 108);
  b.writeUInt8(h.compression === 'zstd' ? 1 : 0, 109);
  b.writeInt8(h.compressionLevel, 110);
  b.writeUInt8(h.encryption ? 1 : 0, 111);
  const name = Buffer.from(h.volume, 'utf8');
  if (name.length > VOLUME_NAME_BYTES) throw new RangeError(`volume name "${h.volume}" is longer than ${VOLUME_NAME_BYTES} bytes`);
  name.copy(b, 128);
  if (h.encryption) {
    const e = h.encryption;
    b.writeUInt8(1, 192); // KDF: scrypt
    b.writeUInt8(e.kdf.log2N, 193);
    b.writeUInt16LE(e.kdf.r, 194);
    b.writeUInt16LE(e.kdf.p, 196);
    e.kdf.salt.copy(b, 200, 0, 32);
    e.wrappedKey.copy(b, 232, 0, 60);
  }
  createHash('sha256').update(b.subarray(0, HEADER_CHECKSUM_AT)).digest().copy(b, HEADER_CHECKSUM_AT);
  return b;
}

/** `where` names the file in error messages. */
export function decodeHeader(b: Buffer, where: string): ImageHeader {
  if (b.length < 16 || !b.subarray(0, 8).equals(MAGIC)) {
    // ShadowProtect images share our file names (by design) but not our content.
    const hint = /\.(spf|spi)$/i.test(where)
      ? ' It is named like a ShadowProtect image, whose content format is proprietary and cannot be read; imagekeep reads only images it wrote itself.'
      : '';
    throw new ForeignFormatError(`${where} is not an imagekeep image (no IMGKEEP magic).${hint}`);
  }
  const version = b.readUInt16LE(8);
  if (version !== FORMAT_VERSION) {
    throw new UnsupportedVersionError(`${where} uses image format version ${version}; this imagekeep reads version ${FORMAT_VERSION}: upgrade imagekeep`, { version });
  }
  if (b.length < HEADER_SIZE || b.readUInt16LE(10) !== HEADER_SIZE) {
    throw new CorruptImageError(`${where}: header is cut short (${b.length} of ${HEADER_SIZE} bytes); the image is truncated`);
  }
  const sum = createHash('sha256').update(b.subarray(0, HEADER_CHECKSUM_AT)).digest();
  if (!sum.equals(b.subarray(HEADER_CHECKSUM_AT, HEADER_SIZE))) {
    throw new CorruptImageError(`${where}: header checksum mismatch; the image is damaged (restore it from a replica)`);
  }
  const flags = b.readUInt32LE(12);
  const nameEnd = b.indexOf(0, 128);
  const volume = b.subarray(128, nameEnd < 0 || nameEnd > 128 + VOLUME_NAME_BYTES ? 128 + VOLUME_NAME_BYTES : nameEnd).toString('utf8');
  const header: ImageHeader = {
    version,
    chainId: Buffer.from(b.subarray(16, 32)),
    parentPointId: Buffer.from(b.subarray(32, 48)),
    endPointId: Buffer.from(b.subarray(48, 64)),
    createdTime: b.readDoubleLE(64),
    pointTime: b.readDoubleLE(72),
    virtualSize: b.readDoubleLE(80),
    sectorSize: b.readUInt32LE(88),
    blockSize: b.readUInt32LE(92),
    baseNumber: b.readUInt32LE(96),
    first: b.readUInt32LE(100),
    last: b.readUInt32LE(104),
    levelBits: b.readUInt8(108),
    compression: b.readUInt8(109) === 1 ? 'zstd' : 'none',
    compressionLevel: b.readInt8(110),
    encryption: null,
    volume,
    forensic: (flags & FLAG_FORENSIC) !== 0,
    sourceKind: (flags & FLAG_VOLUME) !== 0 ? 'volume' : 'disk',
  };
  if (flags & FLAG_ENCRYPTED) {
    header.encryption = {
      kdf: { log2N: b.readUInt8(193), r: b.readUInt16LE(194), p: b.readUInt16LE(196), salt: Buffer.from(b.subarray(200, 232)) },
      wrappedKey: Buffer.from(b.subarray(232, 292)),
    };
  }
  const bs = header.blockSize;
  if (!Number.isSafeInteger(header.virtualSize) || header.virtualSize < 0 || bs < 4096 || bs > 64 * 2 ** 20 || bs % 512 !== 0 || header.last < header.first) {
    throw new CorruptImageError(`${where}: header fields are inconsistent (size ${header.virtualSize}, block size ${bs}, range ${header.first}..${header.last})`);
  }
  return header;
}

/** Per-entry flags. Bits 8..15 hold how the record is stored. */
export const ENTRY_ZERO = 1;
export const STORED_RAW = 0;
export const STORED_ZSTD = 1;

export interface Trailer {
  indexOffset: number;
  indexLength: number;
  dataBytes: number;
  indexChecksum: Buffer; // sha256 of the index bytes
}

export function encodeTrailer(t: Trailer): Buffer {
  const b = Buffer.alloc(TRAILER_SIZE);
  TRAILER_MAGIC.copy(b, 0);
  b.writeDoubleLE(t.indexOffset, 8);
  b.writeDoubleLE(t.indexLength, 16);
  b.writeDoubleLE(t.dataBytes, 24);
  t.indexChecksum.copy(b, 32);
  return b;
}

export function decodeTrailer(b: Buffer, fileSize: number, where: string): Trailer {
  if (!b.subarray(0, 8).equals(TRAILER_MAGIC)) {
    throw new CorruptImageError(`${where}: no index trailer at the end of the file (${fileSize} bytes); the image is truncated or was never finished`);
  }
  const t: Trailer = {
    indexOffset: b.readDoubleLE(8),
    indexLength: b.readDoubleLE(16),
    dataBytes: b.readDoubleLE(24),
    indexChecksum: Buffer.from(b.subarray(32, 64)),
  };
  const ok =
    Number.isSafeInteger(t.indexOffset) && Number.isSafeInteger(t.indexLength) &&
    t.indexOffset === HEADER_SIZE + t.dataBytes &&
    t.indexOffset + t.indexLength + TRAILER_SIZE === fileSize &&
    t.indexLength >= INDEX_HEADER_SIZE && (t.indexLength - INDEX_HEADER_SIZE) % INDEX_ENTRY_SIZE === 0;
  if (!ok) {
    throw new CorruptImageError(`${where}: trailer places the index at ${t.indexOffset} (+${t.indexLength}) in a ${fileSize}-byte file; the image is damaged`);
  }
  return t;
}

/** The index of one image as parallel typed arrays, sorted by block number. */
export interface ImageIndex {
  count: number;
  blocks: Float64Array;
  /** byte offset of each record in the file (prefix sums of storedLengths) */
  offsets: Float64Array;
  storedLengths: Uint32Array;
  flags: Uint16Array;
  /** DIGEST_SIZE bytes per entry: digest of the uncompressed block */
  digests: Uint8Array;
}

export function encodeIndex(ix: ImageIndex): Buffer {
  const b = Buffer.alloc(INDEX_HEADER_SIZE + ix.count * INDEX_ENTRY_SIZE);
  INDEX_MAGIC.copy(b, 0);
  b.writeDoubleLE(ix.count, 8);
  for (let i = 0; i < ix.count; i++) {
    const at = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
    b.writeDoubleLE(ix.blocks[i]!, at);
    b.writeUInt32LE(ix.storedLengths[i]!, at + 8);
    b.writeUInt32LE(ix.flags[i]!, at + 12);
    b.set(ix.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE), at + 16);
  }
  return b;
}

export function decodeIndex(b: Buffer, blockCount: number, where: string): ImageIndex {
  if (!b.subarray(0, 8).equals(INDEX_MAGIC)) throw new CorruptImageError(`${where}: index magic missing; the image is damaged`);
  const count = b.readDoubleLE(8);
  if (count !== (b.length - INDEX_HEADER_SIZE) / INDEX_ENTRY_SIZE) {
    throw new CorruptImageError(`${where}: index claims ${count} entries but holds ${(b.length - INDEX_HEADER_SIZE) / INDEX_ENTRY_SIZE}`);
  }
  const ix: ImageIndex = {
    count,
    blocks: new Float64Array(count),
    offsets: new Float64Array(count),
    storedLengths: new Uint32Array(count),
    flags: new Uint16Array(count),
    digests: new Uint8Array(count * DIGEST_SIZE),
  };
  // A DataView loop that copies each digest as four 32-bit words: no object per entry
  // (a subarray per entry made decoding ~5x slower, ~200 ms per million entries).
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const d32 = new Uint32Array(ix.digests.buffer, ix.digests.byteOffset, count * (DIGEST_SIZE / 4));
  let offset = HEADER_SIZE;
  let prev = -1;
  for (let i = 0; i < count; i++) {
    const at = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
    const block = dv.getFloat64(at, true);
    if (!(block > prev) || block >= blockCount || !Number.isInteger(block)) {
      throw new CorruptImageError(`${where}: index entry ${i} names block ${block} (after ${prev}, of ${blockCount}); the index is damaged`);
    }
    prev = block;
    ix.blocks[i] = block;
    ix.offsets[i] = offset;
    const len = dv.getUint32(at + 8, true);
    ix.storedLengths[i] = len;
    ix.flags[i] = dv.getUint32(at + 12, true);
    offset += len;
    const d = i * (DIGEST_SIZE / 4);
    d32[d] = dv.getUint32(at + 16, NATIVE_LE);
    d32[d + 1] = dv.getUint32(at + 20, NATIVE_LE);
    d32[d + 2] = dv.getUint32(at + 24, NATIVE_LE);
    d32[d + 3] = dv.getUint32(at + 28, NATIVE_LE);
  }
  return ix;
}

export function emptyIndex(capacity: number): ImageIndex {
  return {
    count: 0,
    blocks: new Float64Array(capacity),
    offsets: new Float64Array(capacity),
    storedLengths: new Uint32Array(capacity),
    flags: new Uint16Array(capacity),
    digests: new Uint8Array(capacity * DIGEST_SIZE),
  };
}

/** Number of blocks of a device, the last one possibly partial. */
export function blockCountOf(virtualSize: number, blockSize: number): number {
  return Math.ceil(virtualSize / blockSize);
}

/** Bytes of block `i` (the last block of a size that is not a multiple of the block size is short). */
export function blockLength(i: number, virtualSize: number, blockSize: number): number {
  return Math.min(blockSize, virtualSize - i * blockSize);
}
