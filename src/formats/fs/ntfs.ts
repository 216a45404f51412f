/**
 * NTFS free space from $Bitmap (MFT record 6), one bit per cluster, 1 = in use.
 *
 * The boot sector gives the geometry and where $MFT starts. We read MFT record 0 ($MFT)
 * to map the MFT itself (it need not be contiguous), then record 3 ($Volume: a volume
 * marked dirty is refused) and record 6 ($Bitmap), applying the update-sequence fixups to
 * each record, then the unnamed $DATA attribute of $Bitmap (resident value, or the
 * clusters its runlist names).
 *
 * Everything is validated before it is used: record signature and number, fixups,
 * attribute lengths within the record, runlists within the volume and covering what
 * they must. Any inconsistency throws CorruptFilesystemError; a valid feature we do not
 * read (a compressed or sparse $Bitmap, $DATA only in an attribute list) throws
 * UnsupportedFilesystemError. Either way the caller claims nothing free.
 */
import type { BlockDevice, ByteRange } from '../types.js';
import { CorruptFilesystemError, UnsupportedFilesystemError } from './errors.js';
import { FreeRunCollector } from './ranges.js';
import { minUnits, readVolume, type AllocationOptions, type FsAllocation, type Volume } from './volume.js';

export const NTFS_OEM_ID = 'NTFS    ';
/** Update sequence arrays protect 512-byte strides whatever the sector size. */
const FIXUP_STRIDE = 512;
/** Windows formats clusters of up to 2 MiB. */
const MAX_CLUSTER_SIZE = 2 * 1024 * 1024;
const MAX_RECORD_SIZE = 64 * 1024;
/** Bitmap bytes read and scanned at a time: 1 MiB covers 8 Mi clusters (32 GiB at 4 KiB). */
const BITMAP_CHUNK = 1024 * 1024;

const ATTR_END = 0xffffffff;
export const ATTR_ATTRIBUTE_LIST = 0x20;
export const ATTR_VOLUME_INFORMATION = 0x70;
export const ATTR_DATA = 0x80;
const ATTR_FLAG_COMPRESSED = 0x0001;
const ATTR_FLAG_ENCRYPTED = 0x4000;
const ATTR_FLAG_SPARSE = 0x8000;
const RECORD_IN_USE = 0x0001;
const VOLUME_IS_DIRTY = 0x0001;

const MFT_RECORD_MFT = 0;
const MFT_RECORD_VOLUME = 3;
const MFT_RECORD_BITMAP = 6;

export interface NtfsBootSector {
  bytesPerSector: number;
  sectorsPerCluster: number;
  clusterSize: number;
  /** Sectors in the volume, as the boot sector counts them (the backup boot sector after them is not counted). */
  totalSectors: number;
  totalClusters: number;
  mftLcn: number;
  mftMirrLcn: number;
  mftRecordSize: number;
}

/** A run of clusters of a non-resident attribute; lcn null for a sparse run. */
export interface NtfsRun {
  vcn: number;
  lcn: number | null;
  length: number;
}

export interface NtfsAttribute {
  type: number;
  name: string;
  flags: number;
  nonResident: boolean;
  /** Resident value. */
  value?: Uint8Array;
  lowestVcn?: number;
  highestVcn?: number;
  allocatedSize?: number;
  dataSize?: number;
  initializedSize?: number;
  /** Where the mapping pairs are within the record, for decodeRunlist. */
  runlistStart?: number;
  runlistEnd?: number;
}

export interface MftRecord {
  flags: number;
  /** Record number stored in the record (NTFS 3.1), if any. */
  number?: number;
  baseRecord: bigint;
  attributes: NtfsAttribute[];
  /** The record bytes after fixups, so runlists can be decoded from it. */
  bytes: Uint8Array;
}

/** True when the volume's first sector carries the NTFS OEM id. */
export function probeNtfs(head: Uint8Array): boolean {
  return head.length >= 11 && String.fromCharCode(...head.subarray(3, 11)) === NTFS_OEM_ID;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Unsigned little-endian integer of 1..8 bytes; above 2^53 it is an error, not a rounded number. */
function uintLE(buf: Uint8Array, at: number, size: number, what: string): number {
  let v = 0;
  for (let i = size - 1; i >= 0; i--) v = v * 256 + buf[at + i];
  if (!Number.isSafeInteger(v)) throw new CorruptFilesystemError(`${what}: value ${v} exceeds 2^53`, { value: v });
  return v;
}

/** Signed little-endian integer of 1..8 bytes. */
function intLE(buf: Uint8Array, at: number, size: number, what: string): number {
  let v = 0;
  for (let i = size - 1; i >= 0; i--) v = v * 256 + buf[at + i];
  if (buf[at + size - 1] & 0x80) v -= 2 ** (8 * size);
  if (!Number.isSafeInteger(v)) throw new CorruptFilesystemError(`${what}: value ${v} exceeds 2^53`, { value: v });
  return v;
}

/** The boot sector (first 512 bytes of the volume). */
export function parseNtfsBootSector(buf: Uint8Array): NtfsBootSector {
  if (buf.length < 512) {
    throw new CorruptFilesystemError(`NTFS boot sector: expected 512 bytes, got ${buf.length}`, { length: buf.length });
  }
  if (!probeNtfs(buf)) {
    throw new CorruptFilesystemError(`NTFS boot sector: expected OEM id "NTFS    " at byte 3, found ${JSON.stringify(String.fromCharCode(...buf.subarray(3, 11)))}`);
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const bytesPerSector = dv.getUint16(0x0b, true);
  if (!isPowerOfTwo(bytesPerSector) || bytesPerSector < 256 || bytesPerSector > 4096) {
    throw new CorruptFilesystemError(`NTFS boot sector: bytes per sector ${bytesPerSector}, expected a power of two in 256..4096`, { bytesPerSector });
  }
  // 1..128 is the count itself; above 128 the byte is a negative exponent: 0xF8 = -8 = 2^8 sectors.
  const spcByte = buf[0x0d];
  const sectorsPerCluster = spcByte <= 0x80 ? spcByte : 2 ** (256 - spcByte);
  if (!isPowerOfTwo(sectorsPerCluster)) {
    throw new CorruptFilesystemError(`NTFS boot sector: sectors per cluster byte 0x${spcByte.toString(16)} is not a power of two`, { spcByte });
  }
  const clusterSize = bytesPerSector * sectorsPerCluster;
  if (clusterSize > MAX_CLUSTER_SIZE) {
    throw new CorruptFilesystemError(`NTFS boot sector: cluster size ${clusterSize} exceeds ${MAX_CLUSTER_SIZE}`, { clusterSize });
  }
  const totalSectors = uintLE(buf, 0x28, 8, 'NTFS boot sector: total sectors');
  const totalClusters = Math.floor(totalSectors / sectorsPerCluster);
  if (totalClusters < 1) {
    throw new CorruptFilesystemError(`NTFS boot sector: ${totalSectors} sectors make no whole cluster of ${sectorsPerCluster} sectors`, { totalSectors });
  }
  const mftLcn = uintLE(buf, 0x30, 8, 'NTFS boot sector: $MFT LCN');
  const mftMirrLcn = uintLE(buf, 0x38, 8, 'NTFS boot sector: $MFTMirr LCN');
  for (const [name, lcn] of [['$MFT', mftLcn], ['$MFTMirr', mftMirrLcn]] as const) {
    if (lcn >= totalClusters) {
      throw new CorruptFilesystemError(`NTFS boot sector: ${name} at cluster ${lcn}, past the volume's ${totalClusters} clusters`, { lcn, totalClusters });
    }
  }
  // Positive: clusters per record; negative: the record is 2^-n bytes (0xF6 = -10 = 1 KiB).
  const cpr = dv.getInt8(0x40);
  const mftRecordSize = cpr > 0 ? cpr * clusterSize : cpr < 0 && cpr >= -31 ? 2 ** -cpr : 0;
  if (!isPowerOfTwo(mftRecordSize) || mftRecordSize < FIXUP_STRIDE || mftRecordSize > MAX_RECORD_SIZE) {
    throw new CorruptFilesystemError(
      `NTFS boot sector: clusters per MFT record byte ${cpr} gives ${mftRecordSize} bytes, expected a power of two in ${FIXUP_STRIDE}..${MAX_RECORD_SIZE}`,
      { cpr, mftRecordSize },
    );
  }
  return { bytesPerSector, sectorsPerCluster, clusterSize, totalSectors, totalClusters, mftLcn, mftMirrLcn, mftRecordSize };
}

/**
 * Undoes the update-sequence protection of a multi-sector record in place: the last two
 * bytes of every 512-byte stride must hold the update sequence number (else the write was
 * torn) and are replaced by the saved bytes from the array.
 */
export function applyFixups(record: Uint8Array, what: string): void {
  const dv = new DataView(record.buffer, record.byteOffset, record.byteLength);
  const usaOffset = dv.getUint16(4, true);
  const usaCount = dv.getUint16(6, true);
  const strides = record.length / FIXUP_STRIDE;
  if (!Number.isInteger(strides) || strides < 1) {
    throw new CorruptFilesystemError(`${what}: record of ${record.length} bytes is not a whole number of ${FIXUP_STRIDE}-byte strides`);
  }
  if (usaCount !== strides + 1) {
    throw new CorruptFilesystemError(`${what}: update sequence array has ${usaCount} entries, expected ${strides + 1} for ${record.length} bytes`, {
      usaCount,
      expected: strides + 1,
    });
  }
  if (usaOffset % 2 !== 0 || usaOffset < 0x28 || usaOffset + usaCount * 2 > FIXUP_STRIDE - 2) {
    throw new CorruptFilesystemError(`${what}: update sequence array at offset ${usaOffset} (${usaCount} entries) is not inside the first stride`, {
      usaOffset,
      usaCount,
    });
  }
  const usn = dv.getUint16(usaOffset, true);
  for (let i = 1; i <= strides; i++) {
    const at = i * FIXUP_STRIDE - 2;
    const seen = dv.getUint16(at, true);
    if (seen !== usn) {
      throw new CorruptFilesystemError(
        `${what}: stride ${i - 1} ends with 0x${seen.toString(16)}, expected the update sequence number 0x${usn.toString(16)} (torn write)`,
        { stride: i - 1, seen, usn },
      );
    }
    dv.setUint16(at, dv.getUint16(usaOffset + 2 * i, true), true);
  }
}

/** An MFT record with fixups applied (in place) and its attributes listed. */
export function parseMftRecord(record: Uint8Array, what: string): MftRecord {
  const sig = String.fromCharCode(...record.subarray(0, 4));
  if (sig !== 'FILE') {
    throw new CorruptFilesystemError(`${what}: expected signature "FILE", found ${JSON.stringify(sig)}`, { signature: sig });
  }
  applyFixups(record, what);
  const dv = new DataView(record.buffer, record.byteOffset, record.byteLength);
  const usaOffset = dv.getUint16(4, true);
  const attrsOffset = dv.getUint16(0x14, true);
  const flags = dv.getUint16(0x16, true);
  const bytesInUse = dv.getUint32(0x18, true);
  const bytesAllocated = dv.getUint32(0x1c, true);
  if (bytesAllocated !== record.length) {
    throw new CorruptFilesystemError(`${what}: allocated size ${bytesAllocated}, expected the record size ${record.length}`, { bytesAllocated });
  }
  if (bytesInUse > record.length || bytesInUse % 8 !== 0) {
    throw new CorruptFilesystemError(`${what}: ${bytesInUse} bytes in use in a ${record.length}-byte record`, { bytesInUse });
  }
  if (attrsOffset % 8 !== 0 || attrsOffset < usaOffset || attrsOffset + 4 > bytesInUse) {
    throw new CorruptFilesystemError(`${what}: first attribute at ${attrsOffset} is outside the ${bytesInUse} bytes in use`, { attrsOffset, bytesInUse });
  }
  const attributes: NtfsAttribute[] = [];
  let at = attrsOffset;
  for (;;) {
    if (at + 4 > bytesInUse) {
      throw new CorruptFilesystemError(`${what}: attribute list runs past the ${bytesInUse} bytes in use without an end marker`, { at });
    }
    const type = dv.getUint32(at, true);
    if (type === ATTR_END) break;
    if (at + 0x18 > bytesInUse) {
      throw new CorruptFilesystemError(`${what}: attribute header at ${at} passes the ${bytesInUse} bytes in use`, { at });
    }
    const length = dv.getUint32(at + 4, true);
    if (length < 0x18 || length % 8 !== 0 || at + length > bytesInUse) {
      throw new CorruptFilesystemError(`${what}: attribute 0x${type.toString(16)} at ${at} has length ${length}, outside the ${bytesInUse} bytes in use`, {
        at,
        type,
        length,
      });
    }
    const nonResident = record[at + 8] !== 0;
    const nameLength = record[at + 9];
    const nameOffset = dv.getUint16(at + 10, true);
    if (nameLength > 0 && nameOffset + nameLength * 2 > length) {
      throw new CorruptFilesystemError(`${what}: name of attribute 0x${type.toString(16)} at ${at} passes its ${length} bytes`, { at, type });
    }
    const name = nameLength > 0 ? new TextDecoder('utf-16le').decode(record.subarray(at + nameOffset, at + nameOffset + nameLength * 2)) : '';
    const attr: NtfsAttribute = { type, name, flags: dv.getUint16(at + 12, true), nonResident };
    if (!nonResident) {
      const valueLength = dv.getUint32(at + 0x10, true);
      const valueOffset = dv.getUint16(at + 0x14, true);
      if (valueOffset + valueLength > length) {
        throw new CorruptFilesystemError(`${what}: value of resident attribute 0x${type.toString(16)} at ${at} passes its ${length} bytes`, {
          at,
          valueOffset,
          valueLength,
        });
      }
      attr.value = record.subarray(at + valueOffset, at + valueOffset + valueLength);
    } else {
      if (length < 0x40) {
        throw new CorruptFilesystemError(`${what}: non-resident attribute 0x${type.toString(16)} at ${at} is ${length} bytes, less than its 64-byte header`);
      }
      const runlistOffset = dv.getUint16(at + 0x20, true);
      if (runlistOffset < 0x40 || runlistOffset >= length) {
        throw new CorruptFilesystemError(`${what}: runlist of attribute 0x${type.toString(16)} at offset ${runlistOffset}, outside its ${length} bytes`, {
          runlistOffset,
        });
      }
      attr.lowestVcn = uintLE(record, at + 0x10, 8, `${what}: lowest VCN`);
      attr.highestVcn = intLE(record, at + 0x18, 8, `${what}: highest VCN`);
      attr.allocatedSize = uintLE(record, at + 0x28, 8, `${what}: allocated size`);
      attr.dataSize = uintLE(record, at + 0x30, 8, `${what}: data size`);
      attr.initializedSize = uintLE(record, at + 0x38, 8, `${what}: initialized size`);
      attr.runlistStart = at + runlistOffset;
      attr.runlistEnd = at + length;
    }
    attributes.push(attr);
    at += length;
  }
  return {
    flags,
    number: usaOffset >= 0x30 ? dv.getUint32(0x2c, true) : undefined,
    baseRecord: dv.getBigUint64(0x20, true),
    attributes,
    bytes: record,
  };
}

/**
 * Mapping pairs from bytes [start, end): each run a header byte (low nibble: size of the
 * length, high nibble: size of the signed LCN delta, 0 = sparse), ended by a zero byte.
 * Every run must lie inside the volume's `totalClusters`.
 */
export function decodeRunlist(buf: Uint8Array, start: number, end: number, firstVcn: number, totalClusters: number, what: string): NtfsRun[] {
  const runs: NtfsRun[] = [];
  let at = start;
  let vcn = firstVcn;
  let lcn = 0;
  for (;;) {
    if (at >= end) throw new CorruptFilesystemError(`${what}: runlist has no terminating zero byte before offset ${end}`, { end });
    const header = buf[at];
    if (header === 0) break;
    const lengthSize = header & 0x0f;
    const offsetSize = header >> 4;
    if (lengthSize === 0 || lengthSize > 8 || offsetSize > 8) {
      throw new CorruptFilesystemError(`${what}: runlist header byte 0x${header.toString(16)} at offset ${at} is malformed`, { at, header });
    }
    if (at + 1 + lengthSize + offsetSize > end) {
      throw new CorruptFilesystemError(`${what}: run at offset ${at} passes the end of the attribute at ${end}`, { at, end });
    }
    const length = intLE(buf, at + 1, lengthSize, `${what}: run length`);
    if (length <= 0) throw new CorruptFilesystemError(`${what}: run at offset ${at} has length ${length}`, { at, length });
    if (offsetSize === 0) {
      runs.push({ vcn, lcn: null, length });
    } else {
      lcn += intLE(buf, at + 1 + lengthSize, offsetSize, `${what}: run offset`);
      if (lcn < 0 || lcn + length > totalClusters) {
        throw new CorruptFilesystemError(
          `${what}: run of ${length} clusters at cluster ${lcn} lies outside the volume's ${totalClusters} clusters`,
          { lcn, length, totalClusters },
        );
      }
      runs.push({ vcn, lcn, length });
    }
    vcn += length;
    at += 1 + lengthSize + offsetSize;
  }
  return runs;
}

function unnamedData(rec: MftRecord, what: string): NtfsAttribute {
  const data = rec.attributes.filter((a) => a.type === ATTR_DATA && a.name === '');
  if (data.length === 0) {
    const listed = rec.attributes.some((a) => a.type === ATTR_ATTRIBUTE_LIST);
    if (listed) throw new UnsupportedFilesystemError(`${what}: $DATA lives in extension records named by an attribute list, which we do not follow`);
    throw new CorruptFilesystemError(`${what}: no unnamed $DATA attribute`);
  }
  if (data.length > 1) {
    throw new CorruptFilesystemError(`${what}: ${data.length} unnamed $DATA attributes in the base record; expected one`, { count: data.length });
  }
  return data[0];
}

/** The runs of a non-resident unnamed $DATA, checked to start at VCN 0 and run to its highest VCN. */
function dataRuns(rec: MftRecord, attr: NtfsAttribute, boot: NtfsBootSector, what: string): NtfsRun[] {
  if (attr.flags & (ATTR_FLAG_COMPRESSED | ATTR_FLAG_ENCRYPTED)) {
    throw new UnsupportedFilesystemError(`${what}: $DATA is compressed or encrypted (flags 0x${attr.flags.toString(16)})`, { flags: attr.flags });
  }
  if (attr.lowestVcn !== 0) {
    throw new UnsupportedFilesystemError(`${what}: base record's $DATA starts at VCN ${attr.lowestVcn}, not 0 (attribute list)`, { lowestVcn: attr.lowestVcn });
  }
  const runs = decodeRunlist(rec.bytes, attr.runlistStart ?? 0, attr.runlistEnd ?? 0, 0, boot.totalClusters, what);
  const next = runs.length > 0 ? runs[runs.length - 1].vcn + runs[runs.length - 1].length : 0;
  if (attr.highestVcn === undefined || next !== attr.highestVcn + 1) {
    throw new CorruptFilesystemError(`${what}: runlist covers VCNs 0..${next - 1}, the attribute says 0..${attr.highestVcn}`, {
      covered: next,
      highestVcn: attr.highestVcn,
    });
  }
  const allocated = attr.allocatedSize ?? 0;
  const initialized = attr.initializedSize ?? 0;
  const size = attr.dataSize ?? 0;
  if (initialized > size || size > allocated) {
    throw new CorruptFilesystemError(`${what}: sizes out of order: initialized ${initialized}, data ${size}, allocated ${allocated}`, {
      initialized,
      size,
      allocated,
    });
  }
  if (next * boot.clusterSize !== allocated) {
    // Less mapped than allocated: the rest is in extension records named by an attribute list.
    if (next * boot.clusterSize < allocated && rec.attributes.some((a) => a.type === ATTR_ATTRIBUTE_LIST)) {
      throw new UnsupportedFilesystemError(`${what}: $DATA continues in extension records (attribute list), which we do not follow`);
    }
    throw new CorruptFilesystemError(`${what}: runlist maps ${next * boot.clusterSize} bytes, the attribute says ${allocated} are allocated`, {
      mapped: next * boot.clusterSize,
      allocated,
    });
  }
  return runs;
}

/** Bytes [offset, offset + length) of a non-resident stream. Sparse runs are refused: they would read as zeros. */
async function readRuns(vol: Volume, runs: NtfsRun[], clusterSize: number, offset: number, length: number, what: string): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  for (const run of runs) {
    if (done === length) break;
    const runStart = run.vcn * clusterSize;
    const runEnd = runStart + run.length * clusterSize;
    const want = offset + done;
    if (runEnd <= want) continue;
    if (runStart > want) break;
    if (run.lcn === null) {
      throw new UnsupportedFilesystemError(`${what}: byte ${want} falls in a sparse run`, { offset: want });
    }
    const n = Math.min(runEnd - want, length - done);
    const piece = await readVolume(vol, run.lcn * clusterSize + (want - runStart), n, what);
    out.set(piece, done);
    done += n;
  }
  if (done !== length) {
    throw new CorruptFilesystemError(`${what}: runlist ends before byte ${offset + done} of the ${offset + length} needed`, { offset, length, done });
  }
  return out;
}

async function readRecord(vol: Volume, boot: NtfsBootSector, mftRuns: NtfsRun[] | null, number: number, name: string): Promise<MftRecord> {
  const what = `NTFS MFT record ${number} (${name})`;
  const offset = number * boot.mftRecordSize;
  const raw = mftRuns
    ? await readRuns(vol, mftRuns, boot.clusterSize, offset, boot.mftRecordSize, what)
    : await readVolume(vol, boot.mftLcn * boot.clusterSize + offset, boot.mftRecordSize, what);
  const rec = parseMftRecord(raw, what);
  if (!(rec.flags & RECORD_IN_USE)) throw new CorruptFilesystemError(`${what}: not marked in use`, { flags: rec.flags });
  if (rec.number !== undefined && rec.number !== number) {
    throw new CorruptFilesystemError(`${what}: the record says it is number ${rec.number}`, { stored: rec.number });
  }
  if (rec.baseRecord !== 0n) throw new CorruptFilesystemError(`${what}: is an extension record of base ${rec.baseRecord}`);
  return rec;
}

/** Free clusters of the NTFS volume occupying `volume` (device bytes) of `dev`. */
export async function readNtfsAllocation(dev: BlockDevice, volume: ByteRange, options: AllocationOptions = {}): Promise<FsAllocation> {
  const vol: Volume = { dev, range: volume, signal: options.signal };
  const boot = parseNtfsBootSector(await readVolume(vol, 0, 512, 'NTFS boot sector'));
  const fsBytes = boot.totalSectors * boot.bytesPerSector;
  if (fsBytes > volume.length) {
    throw new CorruptFilesystemError(
      `NTFS: ${boot.totalSectors} sectors of ${boot.bytesPerSector} bytes (${fsBytes} bytes) do not fit the volume of ${volume.length} bytes`,
      { totalSectors: boot.totalSectors, volumeLength: volume.length },
    );
  }

  // $MFT maps itself: record 0 is at the boot sector's LCN, its $DATA runlist places the rest.
  const mftRec = await readRecord(vol, boot, null, MFT_RECORD_MFT, '$MFT');
  const mftData = unnamedData(mftRec, 'NTFS $MFT');
  if (!mftData.nonResident) throw new CorruptFilesystemError('NTFS $MFT: $DATA is resident');
  const mftRuns = dataRuns(mftRec, mftData, boot, 'NTFS $MFT $DATA');
  if (mftRuns[0]?.lcn !== boot.mftLcn) {
    throw new CorruptFilesystemError(`NTFS $MFT: $DATA starts at cluster ${mftRuns[0]?.lcn}, the boot sector says ${boot.mftLcn}`);
  }
  const needMft = (MFT_RECORD_BITMAP + 1) * boot.mftRecordSize;
  if ((mftData.initializedSize ?? 0) < needMft) {
    throw new CorruptFilesystemError(`NTFS $MFT: initialized size ${mftData.initializedSize} holds fewer than ${MFT_RECORD_BITMAP + 1} records`);
  }

  const volRec = await readRecord(vol, boot, mftRuns, MFT_RECORD_VOLUME, '$Volume');
  const info = volRec.attributes.find((a) => a.type === ATTR_VOLUME_INFORMATION && !a.nonResident);
  if (!info?.value || info.value.length < 12) throw new CorruptFilesystemError('NTFS $Volume: no resident $VOLUME_INFORMATION of 12 bytes or more');
  const volumeFlags = info.value[10] + info.value[11] * 256;
  if (volumeFlags & VOLUME_IS_DIRTY) {
    throw new UnsupportedFilesystemError(`NTFS: the volume is marked dirty (flags 0x${volumeFlags.toString(16)}); run chkdsk`, { volumeFlags });
  }

  const bmpRec = await readRecord(vol, boot, mftRuns, MFT_RECORD_BITMAP, '$Bitmap');
  const bmp = unnamedData(bmpRec, 'NTFS $Bitmap');
  const bitmapBytes = Math.ceil(boot.totalClusters / 8);
  const collector = new FreeRunCollector(volume.offset, boot.clusterSize, minUnits(options, boot.clusterSize));
  let read: (offset: number, length: number) => Promise<Uint8Array>;
  if (!bmp.nonResident) {
    const value = bmp.value ?? new Uint8Array(0);
    if (value.length < bitmapBytes) {
      throw new CorruptFilesystemError(`NTFS $Bitmap: resident value of ${value.length} bytes, expected ${bitmapBytes} for ${boot.totalClusters} clusters`);
    }
    read = async (offset, length) => value.subarray(offset, offset + length);
  } else {
    if (bmp.flags & ATTR_FLAG_SPARSE) throw new UnsupportedFilesystemError('NTFS $Bitmap: $DATA is sparse');
    const runs = dataRuns(bmpRec, bmp, boot, 'NTFS $Bitmap $DATA');
    const size = Math.min(bmp.dataSize ?? 0, bmp.initializedSize ?? 0);
    if (size < bitmapBytes) {
      throw new CorruptFilesystemError(
        `NTFS $Bitmap: data size ${bmp.dataSize} / initialized size ${bmp.initializedSize}, expected at least ${bitmapBytes} bytes for ${boot.totalClusters} clusters`,
        { dataSize: bmp.dataSize, initializedSize: bmp.initializedSize, bitmapBytes },
      );
    }
    read = (offset, length) => readRuns(vol, runs, boot.clusterSize, offset, length, 'NTFS $Bitmap');
  }
  for (let offset = 0; offset < bitmapBytes; offset += BITMAP_CHUNK) {
    const length = Math.min(BITMAP_CHUNK, bitmapBytes - offset);
    const chunk = await read(offset, length);
    const firstCluster = offset * 8;
    collector.addBitmap(chunk, firstCluster, Math.min(length * 8, boot.totalClusters - firstCluster));
  }
  const free = collector.ranges();
  return {
    fs: 'ntfs',
    unitSize: boot.clusterSize,
    unitCount: boot.totalClusters,
    free,
    freeBytes: collector.freeUnits * boot.clusterSize,
    notes: [],
  };
}
