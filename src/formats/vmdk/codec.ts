/**
 * The VMDK codec: pure parse/serialise functions over buffers, no I/O.
 *
 * A VMDK disk is a text descriptor naming one or more extents. A hosted sparse extent
 * ("KDMV", little-endian) holds a 512-byte header, optionally the descriptor itself
 * (monolithicSparse, streamOptimized), a grain directory (GD) of u32 sector numbers of grain
 * tables (GT), and GTs of u32 sector numbers of grains (64 KiB by default). A flat extent
 * (monolithicFlat, vmfs) is the raw bytes of the disk in a `-flat.vmdk` file beside the
 * descriptor. Sources: VMware's "Virtual Disk Format 5.0", libvmdk's format notes, and what
 * qemu 7.2 and libvmdk 20200926 accept (../shared/reference/formats.md §3).
 */
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import { SECTOR, ceilDiv } from '../bytes.js';

export const HEADER_SIZE = 512;

export const FLAG_NEWLINE_TEST = 0x1;
export const FLAG_REDUNDANT_GD = 0x2;
export const FLAG_ZEROED_GRAIN_GTE = 0x4;
export const FLAG_COMPRESSED = 0x10000;
export const FLAG_MARKERS = 0x20000;

export const COMPRESSION_NONE = 0;
export const COMPRESSION_DEFLATE = 1;

/** Grain table entry 1 means "reads as zeros" when FLAG_ZEROED_GRAIN_GTE is set. */
export const GTE_ZEROED = 1;

export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

/** A grain marker is {lba u64, size u32} followed directly by the zlib stream. */
export const GRAIN_MARKER_SIZE = 12;

/** The descriptor's first line as VMware writes it; libvmdk refuses any other spelling. */
export const DESCRIPTOR_SIGNATURE = '# Disk DescriptorFile';

/** 2^44 sectors = 2^53 bytes: the most a JavaScript number addresses exactly. */
export const MAX_CAPACITY_SECTORS = 2 ** 44;
/** GTEs are u32 sector numbers, so grains must start below 2^32 sectors (2 TiB) of the file. */
export const MAX_SPARSE_FILE_SECTORS = 2 ** 32;
/** The largest grain we accept: VMware writes 128 sectors; qemu's upper bound (1 GiB) would let a lying header make us allocate a gigabyte per read. */
export const MAX_GRAIN_SECTORS = 2048;
/** qemu's limit too ("L2 table size too big"); VMware always writes 512. */
export const MAX_GTES_PER_GT = 512;
/** Embedded descriptors are a few hundred bytes; 1 MiB is qemu's read limit for them. */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
/** A GD of 2^24 entries maps 512 PiB at 64 KiB grains; larger is a lie, whatever the file size. */
export const MAX_GD_ENTRIES = 2 ** 24;

export type VmdkSubformat = 'monolithicSparse' | 'streamOptimized' | 'monolithicFlat' | 'vmfs';
export const SUBFORMATS: readonly VmdkSubformat[] = ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'vmfs'];

// ---------------------------------------------------------------------------------------
// Zero test

export { isAllZero as isZero } from '../bytes.js';

// ---------------------------------------------------------------------------------------
// Sparse extent header

export interface SparseHeader {
  version: number;
  flags: number;
  /** Sectors of the extent. */
  capacity: number;
  /** Sectors per grain. */
  grainSize: number;
  /** Sector of the embedded descriptor, 0 when there is none. */
  descriptorOffset: number;
  descriptorSize: number;
  numGTEsPerGT: number;
  /** Sector of the redundant GD, 0 when there is none. */
  rgdOffset: number;
  /** Sector of the GD; meaningless when gdAtEnd (then the footer has it). */
  gdOffset: number;
  /** The header says GD_AT_END (all ones): a streamOptimized file with a footer. */
  gdAtEnd: boolean;
  /** Sectors before the first grain. */
  overHead: number;
  uncleanShutdown: boolean;
  /** The "\n \r\n" bytes arrived as written (a file copied in text mode fails this). */
  newlineBytesIntact: boolean;
  compressAlgorithm: number;
}

const NEWLINE_BYTES = [0x0a, 0x20, 0x0d, 0x0a];
const ALL_ONES_U64 = 0xffffffffffffffffn;

export function hasKdmvMagic(buf: Uint8Array): boolean {
  return buf.length >= 4 && buf[0] === 0x4b && buf[1] === 0x44 && buf[2] === 0x4d && buf[3] === 0x56;
}

function u64(view: DataView, at: number, field: string, where: string): number {
  const v = view.getBigUint64(at, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(
      `${where}: VMDK header field ${field} is ${v}, beyond any real disk; the file is damaged or was not written as a VMDK (restore it from another copy)`,
      { field, value: v.toString() },
    );
  }
  return Number(v);
}

/** Parses the 512-byte header of a hosted sparse extent (the same layout serves as the streamOptimized footer). */
export function parseSparseHeader(buf: Uint8Array, where = 'VMDK'): SparseHeader {
  if (buf.length < HEADER_SIZE) {
    throw new CorruptImageError(`${where}: a VMDK sparse header is 512 bytes, only ${buf.length} are there; the file is truncated`);
  }
  if (!hasKdmvMagic(buf)) {
    throw new ForeignFormatError(`${where}: no "KDMV" signature at the start; this is not a VMDK sparse extent`);
  }
  const view = new DataView(buf.buffer, buf.byteOffset, HEADER_SIZE);
  const gdRaw = view.getBigUint64(56, true);
  const gdAtEnd = gdRaw === ALL_ONES_U64;
  return {
    version: view.getUint32(4, true),
    flags: view.getUint32(8, true),
    capacity: u64(view, 12, 'capacity', where),
    grainSize: u64(view, 20, 'grainSize', where),
    descriptorOffset: u64(view, 28, 'descriptorOffset', where),
    descriptorSize: u64(view, 36, 'descriptorSize', where),
    numGTEsPerGT: view.getUint32(44, true),
    rgdOffset: u64(view, 48, 'rgdOffset', where),
    gdOffset: gdAtEnd ? 0 : u64(view, 56, 'gdOffset', where),
    gdAtEnd,
    overHead: u64(view, 64, 'overHead', where),
    uncleanShutdown: buf[72] !== 0,
    newlineBytesIntact: NEWLINE_BYTES.every((b, i) => buf[73 + i] === b),
    compressAlgorithm: view.getUint16(77, true),
  };
}

export function serializeSparseHeader(h: SparseHeader): Uint8Array {
  const buf = new Uint8Array(HEADER_SIZE);
  const view = new DataView(buf.buffer);
  buf.set([0x4b, 0x44, 0x4d, 0x56], 0);
  view.setUint32(4, h.version, true);
  view.setUint32(8, h.flags, true);
  view.setBigUint64(12, BigInt(h.capacity), true);
  view.setBigUint64(20, BigInt(h.grainSize), true);
  view.setBigUint64(28, BigInt(h.descriptorOffset), true);
  view.setBigUint64(36, BigInt(h.descriptorSize), true);
  view.setUint32(44, h.numGTEsPerGT, true);
  view.setBigUint64(48, BigInt(h.rgdOffset), true);
  view.setBigUint64(56, h.gdAtEnd ? ALL_ONES_U64 : BigInt(h.gdOffset), true);
  view.setBigUint64(64, BigInt(h.overHead), true);
  buf[72] = h.uncleanShutdown ? 1 : 0;
  buf.set(NEWLINE_BYTES, 73);
  view.setUint16(77, h.compressAlgorithm, true);
  return buf;
}

/** qemu decides "compressed" from the algorithm field alone; so do we. */
export function isCompressed(h: SparseHeader): boolean {
  return h.compressAlgorithm === COMPRESSION_DEFLATE;
}

export function hasMarkers(h: SparseHeader): boolean {
  return (h.flags & FLAG_MARKERS) !== 0;
}

export function gdEntryCount(h: Pick<SparseHeader, 'capacity' | 'grainSize' | 'numGTEsPerGT'>): number {
  return ceilDiv(h.capacity, h.numGTEsPerGT * h.grainSize);
}

/** Sectors a table of `entries` u32 occupies (tables are stored in whole sectors). */
export function tableSectors(entries: number): number {
  return ceilDiv(entries * 4, SECTOR);
}

/**
 * The problems of a header that make it unreadable, first the most telling one; empty
 * when the header can be used. `fileSize` bounds every table, so no size in a lying header
 * can make a reader allocate more than the file holds. For a GD_AT_END header pass the
 * footer (which holds the real GD offset).
 */
export function headerProblems(h: SparseHeader, fileSize: number): string[] {
  const p: string[] = [];
  const fileSectors = Math.floor(fileSize / SECTOR);
  if (h.version < 1 || h.version > 3) p.push(`version ${h.version} is not one of the VMDK sparse versions 1, 2 and 3`);
  if ((h.flags & FLAG_NEWLINE_TEST) !== 0 && !h.newlineBytesIntact) {
    p.push('the header\'s newline test bytes were altered, so the file was copied in text mode (copy it again in binary mode)');
  }
  if (h.capacity === 0) p.push('the capacity is 0 sectors');
  if (h.capacity > MAX_CAPACITY_SECTORS) {
    p.push(`the capacity of ${h.capacity} sectors is beyond 2^44 sectors (8 PiB), more than any real disk`);
  }
  if (h.grainSize < 1 || h.grainSize > MAX_GRAIN_SECTORS) {
    p.push(`the grain size of ${h.grainSize} sectors is outside 1..${MAX_GRAIN_SECTORS} (VMware writes 128)`);
  }
  if (h.numGTEsPerGT < 1 || h.numGTEsPerGT > MAX_GTES_PER_GT) {
    p.push(`${h.numGTEsPerGT} entries per grain table is outside 1..${MAX_GTES_PER_GT} (VMware writes 512)`);
  }
  if (h.compressAlgorithm > COMPRESSION_DEFLATE) p.push(`compression algorithm ${h.compressAlgorithm} is unknown (1 is deflate)`);
  if (p.length > 0) return p;

  const gdEntries = gdEntryCount(h);
  const gdBytes = gdEntries * 4;
  if (gdEntries > MAX_GD_ENTRIES) {
    p.push(`the capacity of ${h.capacity} sectors needs a grain directory of ${gdEntries} entries, more than the ${MAX_GD_ENTRIES} we accept`);
  }
  if (h.overHead > fileSectors) {
    p.push(`the header puts the first grain at sector ${h.overHead} but the file has only ${fileSectors} sectors; the file is truncated`);
  }
  if (h.descriptorOffset !== 0) {
    if (h.descriptorSize * SECTOR > MAX_DESCRIPTOR_BYTES) p.push(`the embedded descriptor of ${h.descriptorSize} sectors is larger than 1 MiB`);
    else if (h.descriptorOffset + h.descriptorSize > fileSectors) {
      p.push(`the embedded descriptor (sectors ${h.descriptorOffset}..${h.descriptorOffset + h.descriptorSize - 1}) passes the end of the file (${fileSectors} sectors)`);
    }
  }
  if (!h.gdAtEnd && (h.gdOffset === 0 || h.gdOffset * SECTOR + gdBytes > fileSize)) {
    p.push(`the grain directory of ${gdEntries} entries at sector ${h.gdOffset} does not fit in the file of ${fileSize} bytes`);
  }
  if ((h.flags & FLAG_REDUNDANT_GD) !== 0 && (h.rgdOffset === 0 || h.rgdOffset * SECTOR + gdBytes > fileSize)) {
    p.push(`the redundant grain directory of ${gdEntries} entries at sector ${h.rgdOffset} does not fit in the file of ${fileSize} bytes`);
  }
  return p;
}

/** Throws the first header problem as a typed error. */
export function assertHeaderUsable(h: SparseHeader, fileSize: number, where: string): void {
  const p = headerProblems(h, fileSize);
  if (p.length === 0) return;
  const details = { capacity: h.capacity, grainSize: h.grainSize, numGTEsPerGT: h.numGTEsPerGT, fileSize };
  if (h.version < 1 || h.version > 3) {
    throw new UnsupportedVersionError(`${where}: ${p[0]}; this VMDK was written by a tool we do not know`, details);
  }
  throw new CorruptImageError(`${where}: ${p[0]}; the file is damaged (restore it from another copy)`, details);
}

// ---------------------------------------------------------------------------------------
// Tables

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** u32 little-endian entries of a GD or GT (a plain copy on little-endian hosts: a 2 TiB disk has 33 million). */
export function parseTable(bytes: Uint8Array, entries: number): Uint32Array {
  const out = new Uint32Array(entries);
  if (LITTLE_ENDIAN_HOST) {
    new Uint8Array(out.buffer).set(bytes.subarray(0, entries * 4));
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < entries; i++) out[i] = view.getUint32(i * 4, true);
  return out;
}

/** Like parseTable, but a view of `bytes` where the host and alignment allow (scans of many tables). */
export function tableView(bytes: Uint8Array, entries: number): Uint32Array {
  if (LITTLE_ENDIAN_HOST && bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, entries);
  return parseTable(bytes, entries);
}

/** A table in whole sectors, zero-padded. */
export function serializeTable(entries: ArrayLike<number>, from = 0, to = entries.length): Uint8Array {
  const out = new Uint8Array(alignSector((to - from) * 4));
  const view = new DataView(out.buffer);
  for (let i = from; i < to; i++) view.setUint32((i - from) * 4, entries[i]!, true);
  return out;
}

function alignSector(n: number): number {
  return ceilDiv(n, SECTOR) * SECTOR;
}

// ---------------------------------------------------------------------------------------
// Stream markers

export interface Marker {
  /** numSectors for metadata markers, the LBA for grain markers. */
  value: number;
  /** 0 for metadata markers, the compressed length for grain markers. */
  size: number;
  /** Metadata marker type (MARKER_*); meaningless for grain markers. */
  type: number;
}

/** Parses a marker's first 12 bytes (16 for the type of a metadata marker). */
export function parseMarker(buf: Uint8Array): Marker {
  const view = new DataView(buf.buffer, buf.byteOffset, Math.min(buf.length, 16));
  const v = view.getBigUint64(0, true);
  return {
    value: v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v),
    size: view.getUint32(8, true),
    type: buf.length >= 16 ? view.getUint32(12, true) : -1,
  };
}

/** A metadata marker sector: {numSectors u64, size u32 = 0, type u32}, zero-padded to 512. */
export function metadataMarker(type: number, numSectors: number): Uint8Array {
  const buf = new Uint8Array(SECTOR);
  const view = new DataView(buf.buffer);
  view.setBigUint64(0, BigInt(numSectors), true);
  view.setUint32(12, type, true);
  return buf;
}

export function writeGrainMarker(into: Uint8Array, lba: number, size: number): void {
  const view = new DataView(into.buffer, into.byteOffset, GRAIN_MARKER_SIZE);
  view.setBigUint64(0, BigInt(lba), true);
  view.setUint32(8, size, true);
}

// ---------------------------------------------------------------------------------------
// Layout of a new monolithicSparse extent, as qemu lays it out

export interface SparseLayout {
  gdEntries: number;
  gdSectors: number;
  gtSectors: number;
  rgdOffset: number;
  gdOffset: number;
  overHead: number;
  /** Sector of the first redundant GT; GT i is at firstRgt + i × gtSectors. */
  firstRgt: number;
  firstGt: number;
}

/**
 * header · descriptor (descriptorSectors from sector 1) · RGD · redundant GTs · GD · GTs ·
 * grains from the next grain-aligned sector. Every GT is preallocated, so growing the disk
 * later only appends grains and changes GT entries (formats.md §3.1, §7).
 */
export function sparseLayout(capacity: number, grainSize: number, numGTEsPerGT: number, descriptorSectors: number): SparseLayout {
  const gdEntries = ceilDiv(capacity, numGTEsPerGT * grainSize);
  const gdSectors = tableSectors(gdEntries);
  const gtSectors = tableSectors(numGTEsPerGT);
  const rgdOffset = 1 + descriptorSectors;
  const firstRgt = rgdOffset + gdSectors;
  const gdOffset = firstRgt + gdEntries * gtSectors;
  const firstGt = gdOffset + gdSectors;
  const overHead = ceilDiv(firstGt + gdEntries * gtSectors, grainSize) * grainSize;
  return { gdEntries, gdSectors, gtSectors, rgdOffset, gdOffset, overHead, firstRgt, firstGt };
}

// ---------------------------------------------------------------------------------------
// Descriptor

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';

export interface ExtentLine {
  access: ExtentAccess;
  /** Sectors of the disk this extent provides. */
  sectors: number;
  /** SPARSE, FLAT, VMFS, ZERO, VMFSSPARSE, SESPARSE, VMFSRDM, ... as written. */
  type: string;
  /** The extent's file, relative to the descriptor's folder (absent for ZERO). */
  fileName?: string;
  /** FLAT/VMFS: where the extent's bytes start in its file, in sectors. */
  startSector: number;
  /** Whether the line gave the start sector (qemu requires it on FLAT and refuses it on VMFS). */
  startSectorGiven?: boolean;
}

export interface Descriptor {
  /** The first line exactly as found (libvmdk needs `# Disk DescriptorFile`). */
  firstLine: string;
  version: number;
  encoding?: string;
  /** 8 hex digits as written. */
  cid: string;
  parentCid: string;
  createType: string;
  parentFileNameHint?: string;
  extents: ExtentLine[];
  /** ddb.* keys without the `ddb.` prefix, values unquoted, in file order. */
  ddb: [string, string][];
}

const EXTENT_RE = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/;

function unquote(v: string): string {
  const t = v.trim();
  return t.length >= 2 && t.startsWith('"') && t.endsWith('"') ? t.slice(1, -1) : t;
}

/** True when `text` looks like a descriptor (qemu accepts comment lines, then `version=`). */
export function looksLikeDescriptor(text: string): boolean {
  return text.startsWith('# Disk DescriptorFile') || text.startsWith('# Disk Descriptor File') || /^(#[^\n]*\n|\s*\n)*version=[123]\r?\n/.test(text);
}

/**
 * Parses descriptor text (an embedded descriptor may be followed by NUL padding). Lines may
 * be indented or end in CR LF; comment lines are skipped. Throws CorruptImageError when
 * createType or the extents are missing.
 */
export function parseDescriptor(text: string, where = 'VMDK descriptor'): Descriptor {
  const nul = text.indexOf('\0');
  if (nul >= 0) text = text.slice(0, nul);
  const lines = text.split('\n').map((l) => l.replace(/\r$/, ''));
  const d: Descriptor = { firstLine: lines[0] ?? '', version: 0, cid: '', parentCid: '', createType: '', extents: [], ddb: [] };
  let haveVersion = false;
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const ext = EXTENT_RE.exec(line);
    if (ext) {
      const sectors = Number(ext[2]);
      const start = ext[5] ? Number(ext[5]) : 0;
      if (sectors > MAX_CAPACITY_SECTORS || start > MAX_CAPACITY_SECTORS) {
        throw new CorruptImageError(`${where}: extent line "${line}" gives a size or start beyond 2^44 sectors (8 PiB); the descriptor is damaged`);
      }
      const line2: ExtentLine = {
        access: ext[1] as ExtentAccess,
        sectors,
        type: ext[3]!.toUpperCase(),
        startSector: start,
        startSectorGiven: ext[5] !== undefined,
      };
      if (ext[4] !== undefined) line2.fileName = ext[4];
      d.extents.push(line2);
      continue;
    }
    const eq = line.indexOf('=');
    if (eq < 0) continue;
    const key = line.slice(0, eq).trim();
    const value = unquote(line.slice(eq + 1));
    if (key.startsWith('ddb.')) d.ddb.push([key.slice(4), value]);
    else if (key === 'version') {
      d.version = Number(value);
      haveVersion = true;
    } else if (key === 'encoding') d.encoding = value;
    else if (key === 'CID') d.cid = value;
    else if (key === 'parentCID') d.parentCid = value;
    else if (key === 'createType') d.createType = value;
    else if (key === 'parentFileNameHint') d.parentFileNameHint = value;
  }
  if (!haveVersion) throw new CorruptImageError(`${where}: no "version=" line; this is not a VMDK descriptor`);
  if (d.createType === '') throw new CorruptImageError(`${where}: no createType line; the descriptor is damaged`);
  if (d.extents.length === 0) throw new CorruptImageError(`${where}: no extent lines ("RW <sectors> <type> \\"<file>\\""); the descriptor is damaged`);
  return d;
}

export function ddbValue(d: Descriptor, key: string): string | undefined {
  return d.ddb.find(([k]) => k === key)?.[1];
}

/** A parent CID other than ffffffff means the disk is a delta of another disk. */
export function hasParent(d: Descriptor): boolean {
  return (d.parentCid !== '' && d.parentCid.toLowerCase() !== 'ffffffff') || d.parentFileNameHint !== undefined;
}

export function serializeDescriptor(d: Descriptor): string {
  const out: string[] = [d.firstLine, `version=${d.version}`];
  if (d.encoding !== undefined) out.push(`encoding="${d.encoding}"`);
  out.push(`CID=${d.cid}`, `parentCID=${d.parentCid}`, `createType="${d.createType}"`);
  if (d.parentFileNameHint !== undefined) out.push(`parentFileNameHint="${d.parentFileNameHint}"`);
  out.push('', '# Extent description');
  for (const e of d.extents) {
    let line = `${e.access} ${e.sectors} ${e.type}`;
    if (e.fileName !== undefined) line += ` "${e.fileName}"`;
    // qemu requires the start sector on FLAT lines and refuses it on VMFS lines
    if (e.type === 'FLAT') line += ` ${e.startSector}`;
    out.push(line);
  }
  out.push('', '# The Disk Data Base', '#DDB', '');
  for (const [k, v] of d.ddb) out.push(`ddb.${k} = "${v}"`);
  return out.join('\n') + '\n';
}

/** Where the CID's value starts in descriptor text, for an in-place update; -1 when absent. */
export function cidValueOffset(text: string): number {
  const m = /(^|\n)[ \t]*CID[ \t]*=[ \t]*/.exec(text);
  return m ? m.index + m[0].length : -1;
}

/**
 * BIOS geometry for a SCSI (lsilogic) disk: 255 heads, 63 sectors per track, cylinders
 * rounded down as VMware's own streamOptimized export does (16 GiB → 2088), at least 1,
 * at most 65535.
 */
export function scsiGeometry(sectors: number): { cylinders: number; heads: number; sectors: number } {
  return { cylinders: Math.max(1, Math.min(65535, Math.floor(sectors / (255 * 63)))), heads: 255, sectors: 63 };
}

/** The extent name written into a descriptor: the final file name without its folder. */
export function baseName(finalName: string): string {
  const i = Math.max(finalName.lastIndexOf('/'), finalName.lastIndexOf('\\'));
  return finalName.slice(i + 1);
}

/** `disk.vmdk` → `disk-flat.vmdk`, as VMware names the data file of a vmfs/monolithicFlat disk. */
export function flatExtentName(finalName: string): string {
  const base = baseName(finalName);
  const stem = /\.vmdk$/i.test(base) ? base.slice(0, -5) : base;
  return `${stem}-flat.vmdk`;
}

export interface NewDescriptorOptions {
  createType: VmdkSubformat;
  sectors: number;
  extentType: 'SPARSE' | 'FLAT' | 'VMFS';
  access: ExtentAccess;
  fileName: string;
  /** 4 random bytes for the CID, 16 for longContentID, 16 for the uuid. */
  random: Uint8Array;
}

/** The descriptor we write for a new disk (formats.md §3.3). */
export function newDescriptor(o: NewDescriptorOptions): Descriptor {
  const hex = (from: number, to: number) => Buffer.from(o.random.subarray(from, to)).toString('hex');
  const uuidBytes = Array.from(o.random.subarray(20, 36), (b) => b.toString(16).padStart(2, '0'));
  // VMware's uuids start 60 00 C2 (its OUI); keep that prefix so tools that inspect it are content
  uuidBytes[0] = '60';
  uuidBytes[1] = '00';
  uuidBytes[2] = 'C2';
  let cid = hex(0, 4);
  // ffffffff means "no parent" and fffffffe has a special meaning to VMware; never use them
  if (cid === 'ffffffff' || cid === 'fffffffe') cid = '7fffffff';
  const geo = scsiGeometry(o.sectors);
  const ddb: [string, string][] = [
    ['adapterType', 'lsilogic'],
    ['geometry.cylinders', String(geo.cylinders)],
    ['geometry.heads', String(geo.heads)],
    ['geometry.sectors', String(geo.sectors)],
    ['longContentID', hex(4, 20)],
    ['uuid', `${uuidBytes.slice(0, 8).join(' ')}-${uuidBytes.slice(8).join(' ')}`],
  ];
  if (o.createType === 'vmfs') ddb.push(['thinProvisioned', '1']);
  // 4 is the oldest hardware version; a disk marked newer than its VM is refused by VMware products
  ddb.push(['virtualHWVersion', '4']);
  const ext: ExtentLine = { access: o.access, sectors: o.sectors, type: o.extentType, fileName: o.fileName, startSector: 0 };
  return {
    firstLine: DESCRIPTOR_SIGNATURE,
    version: 1,
    encoding: 'UTF-8',
    cid,
    parentCid: 'ffffffff',
    createType: o.createType,
    extents: [ext],
    ddb,
  };
}
