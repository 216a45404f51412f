/**
 * qcow2 codec: pure functions over buffers, no I/O (qemu's docs/interop/qcow2.txt).
 *
 * All integers are big-endian. The header is 72 bytes in version 2 and `header_length` bytes
 * (at least 104) in version 3, followed by header extensions up to the end of cluster 0.
 * Guest offsets map through the L1 table to one-cluster L2 tables of 64-bit entries; every
 * host cluster is counted in refcount blocks found through the refcount table.
 *
 * 64-bit table entries are handled as two unsigned 32-bit words (hi, lo): the flags live in
 * hi's top bits, the offset in hi's low 24 bits and lo's bits 9..31. Offsets are rebuilt with
 * arithmetic (`hi * 2^32 + lo`), never with bit operators, because byte offsets pass 2^31.
 */
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** What we write: 104 bytes plus the one-byte compression_type field, padded to a multiple of 8 (as qemu 5.1+ does). */
export const V3_HEADER_LENGTH = 112;
export const MIN_CLUSTER_BITS = 9;
/** qemu refuses clusters above 2 MiB, so nothing real uses them. */
export const MAX_CLUSTER_BITS = 21;
/** qemu's limits: an L1 table of at most 32 MiB and a refcount table of at most 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME = 1023;

const TWO32 = 2 ** 32;

/** Header extension types (qcow2.txt, "Header extensions"). */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

/** L1/L2 entry flags, as bits of the hi word. */
export const HI_COPIED = 0x80000000; // bit 63: refcount is exactly one
export const HI_COMPRESSED = 0x40000000; // bit 62 (L2 only)
/** Bits 32..55 of an offset: the low 24 bits of hi. */
const HI_OFFSET_MASK = 0x00ffffff;
/** Reserved bits that must be zero: L2 standard bits 56..61 (hi) and 1..8 (lo); L1 bits 56..62 and 0..8. */
export const L2_RESERVED_HI = 0x3f000000;
export const L2_RESERVED_LO = 0x000001fe;
export const L1_RESERVED_HI = 0x7f000000;
export const L1_RESERVED_LO = 0x000001ff;
/** Bit 0 of a standard L2 entry (v3): the cluster reads as zeros. */
export const LO_ZERO = 0x00000001;

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

export interface Qcow2Header {
  version: number;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  /** 0 none, 1 AES, 2 LUKS. */
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** refcount_bits = 2^refcountOrder; always 4 (16-bit) in version 2. */
  refcountOrder: number;
  headerLength: number;
  /** 0 zlib (deflate), 1 zstd. */
  compressionType: number;
  backingFileOffset: number;
  backingFileSize: number;
  backingFile: string | null;
  backingFormat: string | null;
  featureNames: FeatureName[];
  /** Every extension in file order, the known ones included. */
  extensions: HeaderExtension[];
  /** Byte offset just past the end-of-extensions marker. */
  extensionsEnd: number;
  /** LUKS header location (crypto header extension). */
  cryptoHeader: { offset: number; length: number } | null;
  bitmaps: { count: number; directorySize: number; directoryOffset: number } | null;
  dataFile: string | null;
}

/** One 64-bit big-endian field as a JS number, or an error naming the field when it passes 2^53. */
function u64(buf: Buffer, at: number, field: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`qcow2 header field ${field} is ${v}, beyond 2^53; the header is damaged (restore the image from another copy)`, { field, value: v.toString() });
  }
  return Number(v);
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.length);
}

/** True when `head` starts with the qcow2 magic (version 2 or 3). */
export function looksLikeQcow2(head: Uint8Array): boolean {
  if (head.length < 8) return false;
  const b = asBuffer(head);
  if (b.readUInt32BE(0) !== QCOW2_MAGIC) return false;
  const version = b.readUInt32BE(4);
  return version === 2 || version === 3;
}

/** How many L1 entries a virtual size needs: each L2 table maps clusterSize/8 clusters. */
export function l1EntriesFor(size: number, clusterBits: number): number {
  const clusterSize = 2 ** clusterBits;
  const bytesPerL2 = clusterSize * (clusterSize / 8);
  return Math.ceil(size / bytesPerL2);
}

/**
 * Parses the header and its extensions from the start of the file (ideally all of cluster 0).
 * `fileSize` bounds every offset and size field, so no caller allocates memory from an
 * unchecked number. Throws ForeignFormatError without the magic, UnsupportedVersionError for
 * versions other than 2 and 3, CorruptImageError for fields that cannot be right.
 * Feature policy (encryption, dirty, external data) is left to `assertReadable`.
 */
export function parseHeader(head: Uint8Array, fileSize: number): Qcow2Header {
  const buf = asBuffer(head);
  if (buf.length < 4 || buf.readUInt32BE(0) !== QCOW2_MAGIC) {
    throw new ForeignFormatError(`not a qcow2 image: the file does not start with "QFI\\xfb" (${buf.length} header bytes read)`);
  }
  if (buf.length < V2_HEADER_LENGTH) {
    throw new CorruptImageError(`qcow2 header cut short: ${buf.length} bytes where at least ${V2_HEADER_LENGTH} are needed; the file is truncated`, { length: buf.length });
  }
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedVersionError(`qcow2 version ${version} is not supported (only 2 and 3); convert it with qemu-img convert -O qcow2 -o compat=1.1`, { version });
  }
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new CorruptImageError(`qcow2 cluster_bits is ${clusterBits}, outside 9..21 (512 B to 2 MiB); the header is damaged`, { clusterBits });
  }
  const clusterSize = 2 ** clusterBits;
  const size = u64(buf, 24, 'size');
  const cryptMethod = buf.readUInt32BE(32);
  const l1Size = buf.readUInt32BE(36);
  const l1TableOffset = u64(buf, 40, 'l1_table_offset');
  const refcountTableOffset = u64(buf, 48, 'refcount_table_offset');
  const refcountTableClusters = buf.readUInt32BE(56);
  const nbSnapshots = buf.readUInt32BE(60);
  const snapshotsOffset = u64(buf, 64, 'snapshots_offset');
  const backingFileOffset = u64(buf, 8, 'backing_file_offset');
  const backingFileSize = buf.readUInt32BE(16);

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_ZLIB;
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) {
      throw new CorruptImageError(`qcow2 v3 header needs ${V3_MIN_HEADER_LENGTH} bytes, only ${buf.length} present; the file is truncated`);
    }
    incompatibleFeatures = buf.readBigUInt64BE(72);
    compatibleFeatures = buf.readBigUInt64BE(80);
    autoclearFeatures = buf.readBigUInt64BE(88);
    refcountOrder = buf.readUInt32BE(96);
    headerLength = buf.readUInt32BE(100);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize || headerLength > buf.length) {
      throw new CorruptImageError(`qcow2 header_length is ${headerLength}; it must be a multiple of 8 between 104 and the cluster size ${clusterSize} (and inside the ${buf.length} bytes read)`, { headerLength });
    }
    if (refcountOrder > 6) {
      throw new CorruptImageError(`qcow2 refcount_order is ${refcountOrder}, above the maximum 6 (64-bit refcounts); the header is damaged`, { refcountOrder });
    }
    if (headerLength > 104) compressionType = buf[104];
  }

  const where = (what: string) => `qcow2 ${what}`;
  const checkTable = (what: string, offset: number, bytes: number, max: number) => {
    if (offset % clusterSize !== 0) {
      throw new CorruptImageError(`${where(what)} offset ${offset} is not aligned to the cluster size ${clusterSize}; the header is damaged`, { offset, clusterSize });
    }
    if (bytes > max) {
      throw new CorruptImageError(`${where(what)} is ${bytes} bytes, above qemu's limit of ${max}; the header is damaged`, { bytes, max });
    }
    if (bytes > 0 && (offset === 0 || offset + bytes > fileSize)) {
      throw new CorruptImageError(`${where(what)} of ${bytes} bytes at ${offset} lies outside the file (${fileSize} bytes); the file is truncated or the header is damaged`, { offset, bytes, fileSize });
    }
  };
  checkTable('L1 table', l1TableOffset, l1Size * 8, MAX_L1_BYTES);
  const l1Needed = l1EntriesFor(size, clusterBits);
  if (l1Size < l1Needed) {
    throw new CorruptImageError(`qcow2 L1 table has ${l1Size} entries but a virtual size of ${size} bytes needs ${l1Needed}; the header is damaged`, { l1Size, l1Needed, size });
  }
  checkTable('refcount table', refcountTableOffset, refcountTableClusters * clusterSize, MAX_REFCOUNT_TABLE_BYTES);
  if (refcountTableClusters === 0) {
    throw new CorruptImageError('qcow2 refcount table has 0 clusters; the header is damaged');
  }
  if (nbSnapshots > 0 && (snapshotsOffset % clusterSize !== 0 || snapshotsOffset >= fileSize)) {
    throw new CorruptImageError(`qcow2 snapshot table at ${snapshotsOffset} is unaligned or outside the file (${fileSize} bytes)`, { snapshotsOffset, fileSize });
  }

  let backingFile: string | null = null;
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_NAME || backingFileSize === 0) {
      throw new CorruptImageError(`qcow2 backing file name is ${backingFileSize} bytes; it must be 1..${MAX_BACKING_NAME}`, { backingFileSize });
    }
    const end = backingFileOffset + backingFileSize;
    if (end > clusterSize || end > buf.length) {
      throw new CorruptImageError(`qcow2 backing file name (${backingFileSize} bytes at ${backingFileOffset}) passes the end of cluster 0 (${Math.min(clusterSize, buf.length)} bytes); the header is damaged`, { backingFileOffset, backingFileSize });
    }
    backingFile = buf.toString('utf8', backingFileOffset, end);
  }

  // Header extensions: type, length, data padded to 8, until type 0 or the end of cluster 0
  // (or the backing file name, which sits after them).
  const extensions: HeaderExtension[] = [];
  let backingFormat: string | null = null;
  const featureNames: FeatureName[] = [];
  let cryptoHeader: Qcow2Header['cryptoHeader'] = null;
  let bitmaps: Qcow2Header['bitmaps'] = null;
  let dataFile: string | null = null;
  const areaEnd = Math.min(buf.length, clusterSize, backingFileOffset !== 0 ? backingFileOffset : Infinity);
  let at = headerLength;
  let extensionsEnd = at;
  while (at + 8 <= areaEnd) {
    const type = buf.readUInt32BE(at);
    const len = buf.readUInt32BE(at + 4);
    if (type === EXT_END) {
      extensionsEnd = at + 8;
      break;
    }
    const dataAt = at + 8;
    if (dataAt + len > areaEnd) {
      throw new CorruptImageError(`qcow2 header extension 0x${type.toString(16)} at ${at} claims ${len} bytes, passing the header area end ${areaEnd}; the header is damaged`, { type, len, at });
    }
    const data = buf.subarray(dataAt, dataAt + len);
    extensions.push({ type, data });
    switch (type) {
      case EXT_BACKING_FORMAT:
        backingFormat = data.toString('utf8');
        break;
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          featureNames.push({ type: data[i], bit: data[i + 1], name: raw.toString('utf8', 0, nul < 0 ? raw.length : nul) });
        }
        break;
      case EXT_CRYPTO_HEADER:
        if (len >= 16) cryptoHeader = { offset: u64(data, 0, 'crypto header offset'), length: u64(data, 8, 'crypto header length') };
        break;
      case EXT_BITMAPS:
        if (len >= 24) bitmaps = { count: data.readUInt32BE(0), directorySize: u64(data, 8, 'bitmap directory size'), directoryOffset: u64(data, 16, 'bitmap directory offset') };
        break;
      case EXT_DATA_FILE:
        dataFile = data.toString('utf8');
        break;
      default:
        break; // unknown extensions may be ignored (qcow2.txt)
    }
    at = dataAt + Math.ceil(len / 8) * 8;
    extensionsEnd = at;
  }

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    backingFileOffset,
    backingFileSize,
    backingFile,
    backingFormat,
    featureNames,
    extensions,
    extensionsEnd,
    cryptoHeader,
    bitmaps,
    dataFile,
  };
}

/** The feature's name from the image's own table, or its bit number. */
function featureLabel(h: Qcow2Header, type: number, bit: number): string {
  const named = h.featureNames.find((f) => f.type === type && f.bit === bit);
  return named ? `"${named.name}" (bit ${bit})` : `bit ${bit}`;
}

/**
 * Refuses what the reader cannot honour: encryption, external data files, extended L2
 * entries, unknown incompatible features, unknown compression, and images qemu marked
 * corrupt. A dirty image (lazy refcounts after a crash) reads fine: only its refcounts are
 * stale, and reading does not use them.
 */
export function assertReadable(h: Qcow2Header, name: string): void {
  if (h.cryptMethod !== 0) {
    const kind = h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    throw new UnsupportedVersionError(`${name} is an encrypted qcow2 (${kind}); imagekeep does not read encrypted qcow2: decrypt it first with qemu-img convert --object secret,... -O qcow2`, { cryptMethod: h.cryptMethod });
  }
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const bits: string[] = [];
    for (let b = 0; b < 64; b++) if ((unknown >> BigInt(b)) & 1n) bits.push(featureLabel(h, 0, b));
    throw new UnsupportedVersionError(`${name} uses incompatible qcow2 feature(s) ${bits.join(', ')} that imagekeep does not know; convert it with qemu-img convert -O qcow2 -o compat=1.1`, { incompatibleFeatures: h.incompatibleFeatures.toString(16) });
  }
  if (h.incompatibleFeatures & INCOMPAT_CORRUPT) {
    throw new CorruptImageError(`${name} is marked corrupt by qemu (incompatible feature bit 1); repair it with qemu-img check -r all before use`);
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) {
    throw new UnsupportedVersionError(`${name} keeps its data in an external file${h.dataFile ? ` (${h.dataFile})` : ''}; imagekeep does not read external data files: convert it with qemu-img convert -O qcow2`);
  }
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) {
    throw new UnsupportedVersionError(`${name} uses extended L2 entries (subclusters); imagekeep does not read them: convert it with qemu-img convert -O qcow2 -o extended_l2=off`);
  }
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION) {
    if (h.compressionType === COMPRESSION_ZLIB) {
      throw new CorruptImageError(`${name} sets the compression-type feature bit but its compression_type field is 0 (zlib); the header is damaged`);
    }
  }
  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedVersionError(`${name} uses qcow2 compression type ${h.compressionType}; imagekeep reads only 0 (zlib) and 1 (zstd)`, { compressionType: h.compressionType });
  }
}

/** Fields of a new image's header (version 3, no backing file). */
export interface NewHeader {
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
}

/** A version 3 header (compat 1.1, no features set, zlib) followed by the end-of-extensions marker. */
export function encodeHeader(h: NewHeader): Buffer {
  const buf = Buffer.alloc(V3_HEADER_LENGTH + 8);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4);
  buf.writeBigUInt64BE(0n, 8); // no backing file
  buf.writeUInt32BE(0, 16);
  buf.writeUInt32BE(h.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(h.size), 24);
  buf.writeUInt32BE(0, 32); // no encryption
  buf.writeUInt32BE(h.l1Size, 36);
  buf.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  buf.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(0, 60); // no snapshots
  buf.writeBigUInt64BE(0n, 64);
  buf.writeBigUInt64BE(0n, 72); // incompatible features
  buf.writeBigUInt64BE(0n, 80); // compatible features
  buf.writeBigUInt64BE(0n, 88); // autoclear features
  buf.writeUInt32BE(h.refcountOrder, 96);
  buf.writeUInt32BE(V3_HEADER_LENGTH, 100);
  buf[104] = COMPRESSION_ZLIB;
  // bytes 105..111: padding; 112..119: the end-of-extensions marker (type 0, length 0)
  return buf;
}

/** Byte offsets of header fields the writer updates in place. */
export const HEADER_REFCOUNT_TABLE_AT = 48; // u64 offset then u32 clusters, 12 bytes
export const HEADER_AUTOCLEAR_AT = 88;

/** The 12 bytes at HEADER_REFCOUNT_TABLE_AT that move the refcount table. */
export function encodeRefcountTablePointer(offset: number, clusters: number): Buffer {
  const buf = Buffer.alloc(12);
  writeU64(buf, 0, offset);
  buf.writeUInt32BE(clusters, 8);
  return buf;
}

// ---- 64-bit table entries as (hi, lo) words ----

/** Bits 9..55 of an L1, L2 or refcount-table entry: the cluster-aligned host offset. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * TWO32 + Math.floor(lo / 512) * 512;
}

/** Writes a u64 that is below 2^53 as two words. */
export function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO32), at);
  buf.writeUInt32BE(value % TWO32, at + 4);
}

/** Reads a u64 as a number; the caller has bounded it (or accepts rounding above 2^53). */
export function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO32 + buf.readUInt32BE(at + 4);
}

/** Stores an entry pointing at `offset` (cluster-aligned), with bit 63 (COPIED) and bit 0 (zero) as given. */
export function writeEntry(buf: Buffer, index: number, offset: number, copied: boolean, zero = false): void {
  const hi = Math.floor(offset / TWO32) + (copied ? HI_COPIED : 0);
  const lo = (offset % TWO32) + (zero ? LO_ZERO : 0);
  buf.writeUInt32BE(hi, index * 8);
  buf.writeUInt32BE(lo, index * 8 + 4);
}

/** A compressed cluster: its data starts at `offset` and runs to the end of the sector `sectors` past offset's sector. */
export interface CompressedRef {
  offset: number;
  /** Bytes from offset to the end of its last sector: an upper bound of the compressed length. */
  length: number;
}

/**
 * Decodes a compressed-cluster descriptor (bits 0..61 of the L2 entry): the low
 * x = 62 - (cluster_bits - 8) bits are the host byte offset, the rest the number of
 * additional 512-byte sectors. BigInt: the split point moves with the cluster size.
 */
export function decodeCompressed(hi: number, lo: number, clusterBits: number): CompressedRef {
  const desc = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = Number(desc & ((1n << x) - 1n));
  const sectors = Number(desc >> x);
  const end = (Math.floor(offset / 512) + sectors + 1) * 512;
  return { offset, length: end - offset };
}

// ---- refcounts ----

/** Entries in one refcount block: cluster_size * 8 / refcount_bits. */
export function refcountsPerBlock(clusterSize: number, refcountOrder: number): number {
  return (clusterSize * 8) / 2 ** refcountOrder;
}

/** The largest refcount an entry can hold. */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** 2 ** refcountOrder - 1;
}

/** Refcount `index` of a block; sub-byte widths are packed from the least significant bit (qcow2.txt). */
export function getRefcount(block: Buffer, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 4:
      return block.readUInt16BE(index * 2);
    case 3:
      return block[index];
    case 5:
      return block.readUInt32BE(index * 4);
    case 6:
      return readU64(block, index * 8);
    default: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)];
      return (byte >> ((index % perByte) * bits)) & (2 ** bits - 1);
    }
  }
}

export function setRefcount(block: Buffer, index: number, refcountOrder: number, value: number): void {
  switch (refcountOrder) {
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 3:
      block[index] = value;
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    case 6:
      writeU64(block, index * 8, value);
      return;
    default: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = (2 ** bits - 1) << shift;
      block[at] = (block[at] & ~mask) | ((value << shift) & mask);
    }
  }
}

// ---- snapshots (read only: the checker counts their clusters) ----

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
}

/**
 * Parses `count` snapshot table entries from `buf` (the table's bytes). Entry sizes vary with
 * the id, name and extra-data lengths, so an entry that runs past the buffer is an error.
 */
export function parseSnapshotTable(buf: Buffer, count: number): { entries: SnapshotEntry[]; bytes: number } {
  const entries: SnapshotEntry[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 40 > buf.length) throw new CorruptImageError(`qcow2 snapshot table entry ${i} at byte ${at} passes the table end (${buf.length} bytes)`);
    const l1TableOffset = readU64(buf, at);
    const l1Size = buf.readUInt32BE(at + 8);
    const idLen = buf.readUInt16BE(at + 12);
    const nameLen = buf.readUInt16BE(at + 14);
    const extra = buf.readUInt32BE(at + 36);
    const idAt = at + 40 + extra;
    const end = idAt + idLen + nameLen;
    if (end > buf.length) throw new CorruptImageError(`qcow2 snapshot table entry ${i} at byte ${at} passes the table end (${buf.length} bytes)`);
    entries.push({ l1TableOffset, l1Size, id: buf.toString('utf8', idAt, idAt + idLen), name: buf.toString('utf8', idAt + idLen, end) });
    at = Math.ceil(end / 8) * 8;
  }
  return { entries, bytes: at };
}
