/**
 * Partition tables: MBR (primaries, and logicals in the extended chain) and GPT, numbered
 * as Linux numbers them (MBR p1-p4 by slot, logicals from p5; GPT entry slot + 1).
 *
 * Design: pure parsers over sectors (`parseMbr`, `parseEbr`, `parseGptHeader`,
 * `parseGptEntries`) that validate every field they use and throw
 * CorruptPartitionTableError saying what was expected and seen; one async reader
 * (`readPartitionTable`) that fetches the sectors they ask for. Fields that lie are
 * bounded before anything is allocated or followed: a GPT entry array is at most
 * 4 MiB, an extended chain at most 256 links and never revisits a sector, and
 * partitions past the device end are clipped (or dropped when they start past it),
 * with a note. Sectors are 512 bytes; 4Kn disks are not handled.
 */
import { crc32 } from 'node:zlib';
import { ImagekeepError } from '../errors.js';
import type { BlockDevice } from '../types.js';

export const SECTOR_SIZE = 512;

export interface Partition {
  /** Linux's number: /dev/sdaN. */
  number: number;
  /** Bytes from the start of the device. */
  offset: number;
  /** Bytes. */
  length: number;
  /** MBR: the type byte as two lowercase hex digits ('07'); GPT: the type GUID, lowercase canonical text. */
  type: string;
  /** GPT partition name. */
  name?: string;
  /** MBR boot flag (status 0x80). */
  bootable?: boolean;
}

export interface PartitionTable {
  scheme: 'gpt' | 'mbr' | 'none';
  sectorSize: 512;
  partitions: Partition[];
  /**
   * Byte ranges holding the table itself (MBR, EBRs, GPT headers and entry arrays).
   * A filesystem that claims these as free is wrong about them.
   */
  structures: { offset: number; length: number; what: string }[];
  /** Things we clipped, dropped or fell back from, one sentence each. */
  notes: string[];
}

/** A partition table whose bytes contradict themselves or the device. */
export class CorruptPartitionTableError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('CORRUPT_PARTITION_TABLE', message, details);
  }
}

/** MBR types that hold an extended chain (DOS 0x05, Windows LBA 0x0f, Linux 0x85). */
const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const GPT_PROTECTIVE_TYPE = 0xee;
/** Linux stops at 256 partitions per disk (DISK_MAX_PARTS). */
const MAX_LOGICALS = 256 - 4;
/** Far above any real table (128 entries of 128 bytes is 16 KiB) and small enough to allocate. */
const MAX_GPT_ENTRY_BYTES = 4 * 1024 * 1024;
const GPT_SIGNATURE = 'EFI PART';

/** True for the type of an MBR extended partition, a container of logicals rather than a volume. */
export function isExtendedType(type: string): boolean {
  return /^[0-9a-f]{2}$/.test(type) && EXTENDED_TYPES.has(parseInt(type, 16));
}

// ---- MBR ------------------------------------------------------------------------------

export interface MbrEntry {
  /** 0..3 */
  slot: number;
  status: number;
  type: number;
  /** Sectors, relative to whatever the table is relative to (the disk, or an EBR). */
  firstSector: number;
  sectorCount: number;
}

export type MbrParse =
  | { kind: 'none'; reason: string }
  | { kind: 'protective' }
  | { kind: 'mbr'; entries: MbrEntry[] };

function hasBootSignature(sector: Uint8Array): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

function ascii(buf: Uint8Array, at: number, length: number): string {
  return String.fromCharCode(...buf.subarray(at, at + length));
}

function mbrEntries(sector: Uint8Array): MbrEntry[] {
  const dv = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  const entries: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const at = 446 + slot * 16;
    entries.push({
      slot,
      status: sector[at],
      type: sector[at + 4],
      firstSector: dv.getUint32(at + 8, true),
      sectorCount: dv.getUint32(at + 12, true),
    });
  }
  return entries;
}

/**
 * Sector 0 of a disk: a partition table, a protective MBR (GPT follows), or neither.
 * The 0x55AA signature is shared with volume boot sectors, so as Linux does we also
 * require each status byte to be 0x00 or 0x80, and we refuse NTFS and FAT boot sectors.
 */
export function parseMbr(sector: Uint8Array): MbrParse {
  if (sector.length < SECTOR_SIZE) {
    throw new CorruptPartitionTableError(`MBR: expected a ${SECTOR_SIZE}-byte sector, got ${sector.length} bytes`, { length: sector.length });
  }
  if (!hasBootSignature(sector)) return { kind: 'none', reason: 'no 0x55AA signature in sector 0' };
  if (ascii(sector, 3, 8) === 'NTFS    ') return { kind: 'none', reason: 'sector 0 is an NTFS boot sector' };
  if (ascii(sector, 54, 5) === 'FAT12' || ascii(sector, 54, 5) === 'FAT16' || ascii(sector, 82, 5) === 'FAT32') {
    if (sector[0] === 0xeb || sector[0] === 0xe9) return { kind: 'none', reason: 'sector 0 is a FAT boot sector' };
  }
  const entries = mbrEntries(sector);
  for (const e of entries) {
    if (e.status !== 0x00 && e.status !== 0x80) {
      return { kind: 'none', reason: `MBR slot ${e.slot + 1} has status 0x${hex2(e.status)}, not 0x00 or 0x80` };
    }
  }
  if (entries.some((e) => e.type === GPT_PROTECTIVE_TYPE && e.sectorCount > 0)) return { kind: 'protective' };
  return { kind: 'mbr', entries: entries.filter((e) => e.type !== 0 && e.sectorCount !== 0) };
}

/**
 * An extended boot record: the logicals it describes (start relative to this EBR) and the
 * link to the next EBR (start relative to the outermost extended partition), if any.
 * A missing signature ends the chain, as in Linux.
 */
export function parseEbr(sector: Uint8Array): { logicals: MbrEntry[]; next?: MbrEntry } | undefined {
  if (sector.length < SECTOR_SIZE) {
    throw new CorruptPartitionTableError(`EBR: expected a ${SECTOR_SIZE}-byte sector, got ${sector.length} bytes`, { length: sector.length });
  }
  if (!hasBootSignature(sector)) return undefined;
  const entries = mbrEntries(sector).filter((e) => e.type !== 0 && e.sectorCount !== 0);
  return {
    logicals: entries.filter((e) => !EXTENDED_TYPES.has(e.type)),
    next: entries.find((e) => EXTENDED_TYPES.has(e.type)),
  };
}

// ---- GPT ------------------------------------------------------------------------------

export interface GptHeader {
  /** The LBA this header says it is at (checked against where it was read). */
  myLba: number;
  alternateLba: number;
  firstUsableLba: number;
  lastUsableLba: number;
  diskGuid: string;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc32: number;
}

export interface GptEntry {
  /** 0-based slot in the entry array. */
  slot: number;
  typeGuid: string;
  uniqueGuid: string;
  firstLba: number;
  /** Inclusive. */
  lastLba: number;
  attributes: bigint;
  name: string;
}

/** Canonical GUID text: the first three fields are stored little-endian. */
export function guidToString(bytes: Uint8Array): string {
  const h = (i: number): string => hex2(bytes[i]);
  return (
    h(3) + h(2) + h(1) + h(0) + '-' + h(5) + h(4) + '-' + h(7) + h(6) + '-' + h(8) + h(9) + '-' +
    h(10) + h(11) + h(12) + h(13) + h(14) + h(15)
  );
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}

/** u64 as a number; values above 2^53 round but stay above every real sector count. */
function u64(dv: DataView, at: number): number {
  return Number(dv.getBigUint64(at, true));
}

/**
 * A GPT header sector read at `lba`. Checks the signature, header size, header CRC32
 * (IEEE, with the CRC field zeroed), that it says it lives at `lba`, and that its entry
 * array has a sane entry size and a bounded total size.
 */
export function parseGptHeader(sector: Uint8Array, lba: number): GptHeader {
  const where = `GPT header at LBA ${lba}`;
  if (sector.length < SECTOR_SIZE) {
    throw new CorruptPartitionTableError(`${where}: expected a ${SECTOR_SIZE}-byte sector, got ${sector.length} bytes`, { lba });
  }
  const signature = ascii(sector, 0, 8);
  if (signature !== GPT_SIGNATURE) {
    throw new CorruptPartitionTableError(`${where}: expected signature "EFI PART", found ${JSON.stringify(signature)}`, { lba });
  }
  const dv = new DataView(sector.buffer, sector.byteOffset, sector.byteLength);
  const headerSize = dv.getUint32(12, true);
  if (headerSize < 92 || headerSize > SECTOR_SIZE) {
    throw new CorruptPartitionTableError(`${where}: header size ${headerSize} is outside 92..${SECTOR_SIZE}`, { lba, headerSize });
  }
  const stored = dv.getUint32(16, true);
  const copy = Uint8Array.from(sector.subarray(0, headerSize));
  copy.fill(0, 16, 20);
  const computed = crc32(copy);
  if (computed !== stored) {
    throw new CorruptPartitionTableError(
      `${where}: header CRC32 is 0x${stored.toString(16)}, the bytes give 0x${computed.toString(16)}`,
      { lba, stored, computed },
    );
  }
  const header: GptHeader = {
    myLba: u64(dv, 24),
    alternateLba: u64(dv, 32),
    firstUsableLba: u64(dv, 40),
    lastUsableLba: u64(dv, 48),
    diskGuid: guidToString(sector.subarray(56, 72)),
    entriesLba: u64(dv, 72),
    entryCount: dv.getUint32(80, true),
    entrySize: dv.getUint32(84, true),
    entriesCrc32: dv.getUint32(88, true),
  };
  if (header.myLba !== lba) {
    throw new CorruptPartitionTableError(`${where}: it says it is at LBA ${header.myLba}`, { lba, myLba: header.myLba });
  }
  const { entrySize, entryCount } = header;
  if (entrySize < 128 || entrySize > 4096 || (entrySize & (entrySize - 1)) !== 0) {
    throw new CorruptPartitionTableError(`${where}: entry size ${entrySize} is not 128 times a power of two up to 4096`, { lba, entrySize });
  }
  if (entryCount * entrySize > MAX_GPT_ENTRY_BYTES) {
    throw new CorruptPartitionTableError(
      `${where}: ${entryCount} entries of ${entrySize} bytes make ${entryCount * entrySize} bytes, more than the ${MAX_GPT_ENTRY_BYTES} we accept`,
      { lba, entryCount, entrySize },
    );
  }
  if (header.firstUsableLba > header.lastUsableLba + 1) {
    throw new CorruptPartitionTableError(
      `${where}: first usable LBA ${header.firstUsableLba} is after last usable LBA ${header.lastUsableLba}`,
      { lba, firstUsableLba: header.firstUsableLba, lastUsableLba: header.lastUsableLba },
    );
  }
  return header;
}

/** Bytes of the entry array a header describes, rounded up to whole sectors. */
export function gptEntryArrayBytes(header: GptHeader): number {
  return Math.ceil((header.entryCount * header.entrySize) / SECTOR_SIZE) * SECTOR_SIZE;
}

/** The entry array (at least entryCount × entrySize bytes): checks its CRC32, returns the used entries. */
export function parseGptEntries(buf: Uint8Array, header: GptHeader): GptEntry[] {
  const bytes = header.entryCount * header.entrySize;
  if (buf.length < bytes) {
    throw new CorruptPartitionTableError(`GPT entry array: expected ${bytes} bytes, got ${buf.length}`, { bytes, got: buf.length });
  }
  const array = buf.subarray(0, bytes);
  const computed = crc32(array);
  if (computed !== header.entriesCrc32) {
    throw new CorruptPartitionTableError(
      `GPT entry array at LBA ${header.entriesLba}: CRC32 is 0x${header.entriesCrc32.toString(16)} in the header, the bytes give 0x${computed.toString(16)}`,
      { stored: header.entriesCrc32, computed },
    );
  }
  const dv = new DataView(array.buffer, array.byteOffset, array.byteLength);
  const utf16 = new TextDecoder('utf-16le');
  const entries: GptEntry[] = [];
  for (let slot = 0; slot < header.entryCount; slot++) {
    const at = slot * header.entrySize;
    const type = array.subarray(at, at + 16);
    if (type.every((b) => b === 0)) continue;
    const nameBytes = array.subarray(at + 56, at + 128);
    let nameEnd = 0;
    while (nameEnd + 1 < nameBytes.length && (nameBytes[nameEnd] !== 0 || nameBytes[nameEnd + 1] !== 0)) nameEnd += 2;
    entries.push({
      slot,
      typeGuid: guidToString(type),
      uniqueGuid: guidToString(array.subarray(at + 16, at + 32)),
      firstLba: u64(dv, at + 32),
      lastLba: u64(dv, at + 40),
      attributes: dv.getBigUint64(at + 48, true),
      name: utf16.decode(nameBytes.subarray(0, nameEnd)),
    });
  }
  return entries;
}

// ---- reader ---------------------------------------------------------------------------

/** Offsets and lengths in sectors, clipped to the device; undefined when it starts past the end. */
function clip(
  firstSector: number,
  sectorCount: number,
  deviceSectors: number,
  label: string,
  notes: string[],
): { offset: number; length: number } | undefined {
  if (firstSector >= deviceSectors) {
    notes.push(`${label} starts at sector ${firstSector}, past the device end (${deviceSectors} sectors); left out`);
    return undefined;
  }
  let count = sectorCount;
  if (firstSector + count > deviceSectors) {
    count = deviceSectors - firstSector;
    notes.push(`${label} (sectors ${firstSector}+${sectorCount}) passes the device end (${deviceSectors} sectors); clipped to ${count} sectors`);
  }
  return { offset: firstSector * SECTOR_SIZE, length: count * SECTOR_SIZE };
}

async function readSectors(dev: BlockDevice, lba: number, count: number): Promise<Uint8Array> {
  const buf = new Uint8Array(count * SECTOR_SIZE);
  await dev.read(buf, lba * SECTOR_SIZE);
  return buf;
}

/** Reads and validates the partition table of a whole disk. */
export async function readPartitionTable(dev: BlockDevice): Promise<PartitionTable> {
  const deviceSectors = Math.floor(dev.size / SECTOR_SIZE);
  const table: PartitionTable = { scheme: 'none', sectorSize: SECTOR_SIZE, partitions: [], structures: [], notes: [] };
  if (deviceSectors < 1) return table;
  const mbr = parseMbr(await readSectors(dev, 0, 1));
  if (mbr.kind === 'none') return table;
  table.structures.push({ offset: 0, length: SECTOR_SIZE, what: 'MBR' });
  if (mbr.kind === 'protective') {
    table.scheme = 'gpt';
    await readGpt(dev, deviceSectors, table);
  } else {
    table.scheme = 'mbr';
    await readMbr(dev, mbr.entries, deviceSectors, table);
  }
  table.partitions.sort((a, b) => a.number - b.number);
  return table;
}

async function readMbr(dev: BlockDevice, entries: MbrEntry[], deviceSectors: number, table: PartitionTable): Promise<void> {
  let nextLogical = 5;
  for (const e of entries) {
    const number = e.slot + 1;
    const range = clip(e.firstSector, e.sectorCount, deviceSectors, `MBR partition ${number}`, table.notes);
    if (!range) continue;
    table.partitions.push({ number, ...range, type: hex2(e.type), bootable: e.status === 0x80 });
    if (EXTENDED_TYPES.has(e.type)) {
      nextLogical = await readExtendedChain(dev, e, number, nextLogical, deviceSectors, table);
    }
  }
}

/** Walks one extended chain; returns the next free logical number. */
async function readExtendedChain(
  dev: BlockDevice,
  extended: MbrEntry,
  extendedNumber: number,
  firstNumber: number,
  deviceSectors: number,
  table: PartitionTable,
): Promise<number> {
  const base = extended.firstSector;
  const visited = new Set<number>();
  let number = firstNumber;
  let ebrLba = base;
  let ebrSectors = extended.sectorCount; // the extent this EBR describes: the container, then each link's size
  for (;;) {
    if (visited.has(ebrLba)) {
      throw new CorruptPartitionTableError(
        `extended partition ${extendedNumber}: the EBR chain loops back to sector ${ebrLba} after ${visited.size} links`,
        { scheme: 'mbr', sector: ebrLba, links: visited.size },
      );
    }
    if (visited.size >= MAX_LOGICALS) {
      throw new CorruptPartitionTableError(
        `extended partition ${extendedNumber}: the EBR chain has more than ${MAX_LOGICALS} links`,
        { scheme: 'mbr', links: visited.size },
      );
    }
    visited.add(ebrLba);
    if (ebrLba >= deviceSectors) {
      table.notes.push(`extended partition ${extendedNumber}: EBR at sector ${ebrLba} is past the device end (${deviceSectors} sectors); chain ends there`);
      return number;
    }
    const ebr = parseEbr(await readSectors(dev, ebrLba, 1));
    if (!ebr) {
      table.notes.push(`extended partition ${extendedNumber}: no 0x55AA signature in the EBR at sector ${ebrLba}; chain ends there`);
      return number;
    }
    table.structures.push({ offset: ebrLba * SECTOR_SIZE, length: SECTOR_SIZE, what: `EBR at sector ${ebrLba}` });
    for (const l of ebr.logicals) {
      // As Linux does: slots 3 and 4 of an EBR often hold garbage, so they count only when
      // they fit both this EBR's extent and the extended partition.
      if (
        l.slot >= 2 &&
        (l.firstSector + l.sectorCount > ebrSectors ||
          ebrLba + l.firstSector + l.sectorCount > base + extended.sectorCount)
      ) {
        table.notes.push(`EBR at sector ${ebrLba}: slot ${l.slot + 1} does not fit the extended partition; ignored as Linux does`);
        continue;
      }
      const range = clip(ebrLba + l.firstSector, l.sectorCount, deviceSectors, `logical partition ${number}`, table.notes);
      if (range) table.partitions.push({ number, ...range, type: hex2(l.type), bootable: l.status === 0x80 });
      number++;
    }
    if (!ebr.next) return number;
    ebrLba = base + ebr.next.firstSector;
    ebrSectors = ebr.next.sectorCount;
  }
}

async function readGpt(dev: BlockDevice, deviceSectors: number, table: PartitionTable): Promise<void> {
  const candidates = [1, deviceSectors - 1].filter((lba, i, all) => lba >= 1 && lba < deviceSectors && all.indexOf(lba) === i);
  const failures: string[] = [];
  for (const lba of candidates) {
    try {
      const header = parseGptHeader(await readSectors(dev, lba, 1), lba);
      const arrayBytes = gptEntryArrayBytes(header);
      const arraySectors = arrayBytes / SECTOR_SIZE;
      if (header.entriesLba < 1 || header.entriesLba + arraySectors > deviceSectors) {
        throw new CorruptPartitionTableError(
          `GPT header at LBA ${lba}: entry array at LBA ${header.entriesLba} (${arraySectors} sectors) is outside the device (${deviceSectors} sectors)`,
          { lba, entriesLba: header.entriesLba, arraySectors, deviceSectors },
        );
      }
      const entries = parseGptEntries(await readSectors(dev, header.entriesLba, arraySectors), header);
      if (failures.length > 0) table.notes.push(`primary GPT unusable (${failures.join('; ')}); used the backup at LBA ${lba}`);
      table.structures.push({ offset: lba * SECTOR_SIZE, length: SECTOR_SIZE, what: `GPT header at LBA ${lba}` });
      table.structures.push({ offset: header.entriesLba * SECTOR_SIZE, length: arrayBytes, what: `GPT entries at LBA ${header.entriesLba}` });
      // Everything outside the usable LBAs belongs to the table (the other copy included).
      const usableStart = Math.min(header.firstUsableLba, deviceSectors);
      const usableEnd = Math.min(header.lastUsableLba + 1, deviceSectors);
      table.structures.push({ offset: 0, length: usableStart * SECTOR_SIZE, what: 'GPT area before the first usable LBA' });
      if (usableEnd < deviceSectors) {
        table.structures.push({ offset: usableEnd * SECTOR_SIZE, length: (deviceSectors - usableEnd) * SECTOR_SIZE, what: 'GPT area after the last usable LBA' });
      }
      addGptPartitions(entries, deviceSectors, table);
      return;
    } catch (err) {
      if (!(err instanceof CorruptPartitionTableError)) throw err;
      failures.push(err.message);
    }
  }
  throw new CorruptPartitionTableError(
    `protective MBR found but no usable GPT header: ${failures.join('; ') || `device of ${deviceSectors} sectors has no room for one`}`,
    { scheme: 'gpt', failures },
  );
}

function addGptPartitions(entries: GptEntry[], deviceSectors: number, table: PartitionTable): void {
  for (const e of entries) {
    const number = e.slot + 1;
    if (e.lastLba < e.firstLba) {
      table.notes.push(`GPT partition ${number}: last LBA ${e.lastLba} is before first LBA ${e.firstLba}; left out`);
      continue;
    }
    const range = clip(e.firstLba, e.lastLba - e.firstLba + 1, deviceSectors, `GPT partition ${number}`, table.notes);
    if (!range) continue;
    const p: Partition = { number, ...range, type: e.typeGuid };
    if (e.name !== '') p.name = e.name;
    table.partitions.push(p);
  }
}
