/**
 * Active-sector mode: which bytes of a disk (or a bare volume) its filesystems mark free,
 * so the backup can record them as zero instead of storing them.
 *
 * The rule is one-sided: a byte is free only when a filesystem bitmap we parsed and
 * trusted says so. Everything else is in use: space outside partitions, partition-table
 * structures, volumes we cannot identify, filesystems whose metadata fails a check or has
 * a feature we do not read (each gets a `note` saying why), parts of a volume that overlap
 * another partition, and whole disks whose layout is ambiguous (a partition table and a
 * filesystem superblock at offset 0). A parser error therefore costs space, never data.
 */
import type { BlockDevice, ByteRange } from '../types.js';
import { UsageError } from '../errors.js';
import { CorruptPartitionTableError, isExtendedType, readPartitionTable, type PartitionTable } from '../disk/partitions.js';
import { EXT_SUPERBLOCK_OFFSET, EXT_SUPERBLOCK_SIZE, parseExtSuperblock, probeExt, readExtAllocation } from './ext.js';
import { probeNtfs, readNtfsAllocation } from './ntfs.js';
import { clipRanges, normalizeRanges, subtractRanges, totalLength } from './ranges.js';
import type { AllocationOptions, FsAllocation } from './volume.js';

export interface VolumeReport {
  /** Linux partition number; absent for a bare volume. */
  partition?: number;
  offset: number;
  length: number;
  fs: 'ntfs' | 'ext' | 'unknown';
  /** Bytes of this volume claimed free (after clipping and overlap removal). */
  freeBytes: number;
  /** Why space that may be free was counted as in use. */
  note?: string;
}

export interface AllocationReport {
  scheme: 'gpt' | 'mbr' | 'none';
  volumes: VolumeReport[];
  /** Device byte ranges that may be recorded as zero: sorted, merged, inside the device. */
  free: ByteRange[];
}

export type FindFreeOptions = AllocationOptions;

/** Head of a volume read for probing: the NTFS boot sector and the ext superblock magic. */
const PROBE_BYTES = 4096;

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Identifies the filesystem at `range` and reads its allocation; errors become notes. */
async function probeVolume(
  dev: BlockDevice,
  range: ByteRange,
  options: FindFreeOptions,
): Promise<{ fs: VolumeReport['fs']; allocation?: FsAllocation; note?: string }> {
  const headLength = Math.min(PROBE_BYTES, range.length, dev.size - range.offset);
  if (headLength <= 0) return { fs: 'unknown', note: 'volume is empty or past the device end' };
  const head = new Uint8Array(headLength);
  await dev.read(head, range.offset);
  const ntfs = probeNtfs(head);
  const ext = probeExt(head);
  if (ntfs && ext) return { fs: 'unknown', note: 'both NTFS and ext signatures present; nothing claimed free' };
  if (!ntfs && !ext) return { fs: 'unknown' };
  const fs = ntfs ? 'ntfs' : 'ext';
  try {
    const allocation = ntfs ? await readNtfsAllocation(dev, range, options) : await readExtAllocation(dev, range, options);
    return { fs, allocation, note: allocation.notes.length > 0 ? allocation.notes.join('; ') : undefined };
  } catch (err) {
    if (options.signal?.aborted) throw err;
    return { fs, note: `${describe(err)}; nothing claimed free` };
  }
}

/** True when offset 0 of a partitioned disk also holds a valid ext superblock (a stale one, or the table is stale). */
async function bareExtAtZero(dev: BlockDevice): Promise<boolean> {
  if (dev.size < EXT_SUPERBLOCK_OFFSET + EXT_SUPERBLOCK_SIZE) return false;
  const sb = new Uint8Array(EXT_SUPERBLOCK_SIZE);
  await dev.read(sb, EXT_SUPERBLOCK_OFFSET);
  try {
    parseExtSuperblock(sb);
    return true;
  } catch {
    return false;
  }
}

/** Free byte ranges of every NTFS and ext volume on `dev`, with a report per volume. */
export async function findFreeRanges(dev: BlockDevice, options: FindFreeOptions = {}): Promise<AllocationReport> {
  const { minRunBytes } = options;
  if (minRunBytes !== undefined && !(Number.isSafeInteger(minRunBytes) && minRunBytes >= 0)) {
    throw new UsageError(`findFreeRanges: minRunBytes must be a non-negative integer, got ${minRunBytes}`, { minRunBytes });
  }
  let table: PartitionTable;
  try {
    table = await readPartitionTable(dev);
  } catch (err) {
    if (!(err instanceof CorruptPartitionTableError)) throw err;
    const scheme = err.details.scheme === 'gpt' || err.details.scheme === 'mbr' ? err.details.scheme : 'none';
    return {
      scheme,
      volumes: [{ offset: 0, length: dev.size, fs: 'unknown', freeBytes: 0, note: `partition table unreadable: ${err.message}; nothing claimed free` }],
      free: [],
    };
  }

  const targets: { partition?: number; range: ByteRange }[] =
    table.scheme === 'none'
      ? [{ range: { offset: 0, length: dev.size } }]
      : table.partitions.filter((p) => !(table.scheme === 'mbr' && isExtendedType(p.type))).map((p) => ({ partition: p.number, range: p }));
  const ambiguous = table.scheme !== 'none' && (await bareExtAtZero(dev));
  const tableNote = table.notes.length > 0 ? `partition table: ${table.notes.join('; ')}` : undefined;

  const volumes: VolumeReport[] = [];
  const allFree: ByteRange[] = [];
  for (const [i, target] of targets.entries()) {
    options.signal?.throwIfAborted();
    const { range } = target;
    const probe = await probeVolume(dev, range, options);
    const notes = probe.note ? [probe.note] : [];
    let free = probe.allocation ? normalizeRanges(probe.allocation.free) : [];
    free = clipRanges(free, range.offset, Math.min(range.offset + range.length, dev.size));
    if (free.length > 0) {
      const others = targets.filter((_, j) => j !== i).map((t) => t.range);
      const overlapping = others.filter((o) => o.offset < range.offset + range.length && range.offset < o.offset + o.length);
      if (overlapping.length > 0) notes.push('overlaps another partition; the overlap counted as in use');
      free = subtractRanges(free, [...others, ...table.structures]);
    }
    if (ambiguous && free.length > 0) {
      notes.push('the disk also carries an ext superblock at offset 0 (stale table or stale filesystem); nothing claimed free');
      free = [];
    }
    if (tableNote && i === 0) notes.push(tableNote);
    const report: VolumeReport = {
      ...(target.partition !== undefined ? { partition: target.partition } : {}),
      offset: range.offset,
      length: range.length,
      fs: probe.fs,
      freeBytes: totalLength(free),
    };
    if (notes.length > 0) report.note = notes.join('; ');
    volumes.push(report);
    allFree.push(...free);
  }
  return { scheme: table.scheme, volumes, free: clipRanges(normalizeRanges(allFree), 0, dev.size) };
}

/**
 * One byte per backup block of `blockSize` bytes, 1 when every byte of the block that
 * exists on the device lies in `free` (the last block may be partial: bytes past the
 * device end do not exist and do not count). Block k covers [k × blockSize, (k + 1) ×
 * blockSize). Arithmetic only, so offsets above 2^31 are exact.
 */
export function freeBlockMask(free: readonly ByteRange[], deviceSize: number, blockSize: number): Uint8Array {
  if (!Number.isSafeInteger(blockSize) || blockSize <= 0) {
    throw new UsageError(`freeBlockMask: block size must be a positive integer, got ${blockSize}`, { blockSize });
  }
  if (!Number.isSafeInteger(deviceSize) || deviceSize < 0) {
    throw new UsageError(`freeBlockMask: device size must be a non-negative integer, got ${deviceSize}`, { deviceSize });
  }
  const tail = deviceSize % blockSize;
  const blockCount = (deviceSize - tail) / blockSize + (tail > 0 ? 1 : 0);
  const mask = new Uint8Array(blockCount);
  for (const r of clipRanges(normalizeRanges(free), 0, deviceSize)) {
    const start = r.offset;
    const end = r.offset + r.length;
    const startRem = start % blockSize;
    const firstBlock = (start - startRem) / blockSize + (startRem > 0 ? 1 : 0);
    const endBlock = end === deviceSize ? blockCount : (end - (end % blockSize)) / blockSize;
    if (endBlock > firstBlock) mask.fill(1, firstBlock, endBlock);
  }
  return mask;
}
