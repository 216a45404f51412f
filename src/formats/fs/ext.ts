/**
 * ext2/3/4 free space from the block bitmaps.
 *
 * The superblock (1024 bytes at volume offset 1024) gives the geometry; the group
 * descriptor table (from block s_first_data_block + 1, 32- or s_desc_size-byte entries)
 * gives each group's bitmap block, which with flex_bg may be anywhere. A bitmap bit per
 * block, 1 = in use; bits past the last block are padding and ignored.
 *
 * Conservative by design: only a bitmap can make a block free. The whole filesystem is
 * refused (UnsupportedFilesystemError) when it was not cleanly unmounted, its journal
 * needs recovery (the journal may hold newer bitmaps), or it has an incompat or
 * bitmap-changing ro_compat feature we do not know (META_BG, bigalloc, ...). A group is
 * counted as fully in use when it is BLOCK_UNINIT or when its bitmap's free count differs
 * from its descriptor's (e2fsck would call that corruption). Pointers are checked against
 * the volume before they are followed.
 */
import type { BlockDevice, ByteRange } from '../types.js';
import { CorruptFilesystemError, UnsupportedFilesystemError } from './errors.js';
import { FreeRunCollector } from './ranges.js';
import { minUnits, readVolume, type AllocationOptions, type FsAllocation, type Volume } from './volume.js';

export const EXT_SUPERBLOCK_OFFSET = 1024;
export const EXT_SUPERBLOCK_SIZE = 1024;
export const EXT_MAGIC = 0xef53;

const STATE_VALID_FS = 0x0001;
const STATE_ERROR_FS = 0x0002;

const INCOMPAT = {
  COMPRESSION: 0x0001,
  FILETYPE: 0x0002,
  RECOVER: 0x0004,
  JOURNAL_DEV: 0x0008,
  META_BG: 0x0010,
  EXTENTS: 0x0040,
  BIT64: 0x0080,
  MMP: 0x0100,
  FLEX_BG: 0x0200,
  EA_INODE: 0x0400,
  DIRDATA: 0x1000,
  CSUM_SEED: 0x2000,
  LARGEDIR: 0x4000,
  INLINE_DATA: 0x8000,
  ENCRYPT: 0x10000,
  CASEFOLD: 0x20000,
} as const;

/** Incompat features that leave block bitmaps meaning what we read them to mean. */
const INCOMPAT_UNDERSTOOD =
  INCOMPAT.FILETYPE | INCOMPAT.EXTENTS | INCOMPAT.BIT64 | INCOMPAT.MMP | INCOMPAT.FLEX_BG | INCOMPAT.EA_INODE |
  INCOMPAT.CSUM_SEED | INCOMPAT.LARGEDIR | INCOMPAT.INLINE_DATA | INCOMPAT.ENCRYPT | INCOMPAT.CASEFOLD;

const INCOMPAT_NAMES: Record<number, string> = {
  [INCOMPAT.COMPRESSION]: 'compression',
  [INCOMPAT.RECOVER]: 'needs_recovery',
  [INCOMPAT.JOURNAL_DEV]: 'journal_dev',
  [INCOMPAT.META_BG]: 'meta_bg',
  [INCOMPAT.DIRDATA]: 'dirdata',
};

const RO_COMPAT = {
  SPARSE_SUPER: 0x0001,
  LARGE_FILE: 0x0002,
  BTREE_DIR: 0x0004,
  HUGE_FILE: 0x0008,
  GDT_CSUM: 0x0010,
  DIR_NLINK: 0x0020,
  EXTRA_ISIZE: 0x0040,
  HAS_SNAPSHOT: 0x0080,
  QUOTA: 0x0100,
  BIGALLOC: 0x0200,
  METADATA_CSUM: 0x0400,
  REPLICA: 0x0800,
  READONLY: 0x1000,
  PROJECT: 0x2000,
  SHARED_BLOCKS: 0x4000,
  VERITY: 0x8000,
  ORPHAN_PRESENT: 0x10000,
} as const;

/**
 * ro_compat features that do not change what a bitmap bit means. Not bigalloc (a bit per
 * cluster), has_snapshot or replica (blocks owned outside the bitmaps' usual sense).
 */
const RO_COMPAT_UNDERSTOOD =
  RO_COMPAT.SPARSE_SUPER | RO_COMPAT.LARGE_FILE | RO_COMPAT.BTREE_DIR | RO_COMPAT.HUGE_FILE | RO_COMPAT.GDT_CSUM |
  RO_COMPAT.DIR_NLINK | RO_COMPAT.EXTRA_ISIZE | RO_COMPAT.QUOTA | RO_COMPAT.METADATA_CSUM | RO_COMPAT.READONLY |
  RO_COMPAT.PROJECT | RO_COMPAT.SHARED_BLOCKS | RO_COMPAT.VERITY | RO_COMPAT.ORPHAN_PRESENT;

const RO_COMPAT_NAMES: Record<number, string> = {
  [RO_COMPAT.HAS_SNAPSHOT]: 'has_snapshot',
  [RO_COMPAT.BIGALLOC]: 'bigalloc',
  [RO_COMPAT.REPLICA]: 'replica',
};

const BG_BLOCK_UNINIT = 0x0002;

/** Largest bitmap read in one go when consecutive groups' bitmaps are adjacent (flex_bg). */
const MAX_BATCH_BYTES = 1024 * 1024;

export interface ExtSuperblock {
  blockSize: number;
  blocksCount: number;
  freeBlocksCount: number;
  firstDataBlock: number;
  blocksPerGroup: number;
  groupCount: number;
  state: number;
  revLevel: number;
  featureCompat: number;
  featureIncompat: number;
  featureRoCompat: number;
  /** Bytes per group descriptor: 32, or s_desc_size with the 64bit feature. */
  descSize: number;
  reservedGdtBlocks: number;
  inodesPerGroup: number;
  inodeSize: number;
}

export interface ExtGroupDescriptor {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  freeBlocksCount: number;
  /** False when only the low 16 bits of the free count are stored (32-byte descriptors). */
  freeBlocksCountComplete: boolean;
  flags: number;
}

/** True when the volume's first bytes (at least 1082) carry the ext superblock magic. */
export function probeExt(head: Uint8Array): boolean {
  const at = EXT_SUPERBLOCK_OFFSET + 56;
  return head.length >= at + 2 && head[at] === (EXT_MAGIC & 0xff) && head[at + 1] === EXT_MAGIC >> 8;
}

function featureNames(bits: number, names: Record<number, string>): string {
  const out: string[] = [];
  for (let bit = 1; bit !== 0 && bit <= bits; bit *= 2) {
    if (bits & bit) out.push(names[bit] ?? `0x${bit.toString(16)}`);
  }
  return out.join(', ');
}

/** The 1024-byte superblock: geometry, checked for internal consistency. */
export function parseExtSuperblock(sb: Uint8Array): ExtSuperblock {
  if (sb.length < EXT_SUPERBLOCK_SIZE) {
    throw new CorruptFilesystemError(`ext superblock: expected ${EXT_SUPERBLOCK_SIZE} bytes, got ${sb.length}`, { length: sb.length });
  }
  const dv = new DataView(sb.buffer, sb.byteOffset, sb.byteLength);
  const magic = dv.getUint16(56, true);
  if (magic !== EXT_MAGIC) {
    throw new CorruptFilesystemError(`ext superblock: expected magic 0xef53, found 0x${magic.toString(16)}`, { magic });
  }
  const logBlockSize = dv.getUint32(24, true);
  if (logBlockSize > 6) {
    throw new CorruptFilesystemError(`ext superblock: s_log_block_size ${logBlockSize} gives a block size above 64 KiB`, { logBlockSize });
  }
  const blockSize = 1024 * 2 ** logBlockSize;
  const revLevel = dv.getUint32(76, true);
  const featureCompat = revLevel === 0 ? 0 : dv.getUint32(92, true);
  const featureIncompat = revLevel === 0 ? 0 : dv.getUint32(96, true);
  const featureRoCompat = revLevel === 0 ? 0 : dv.getUint32(100, true);
  const is64 = (featureIncompat & INCOMPAT.BIT64) !== 0;
  const blocksCount = dv.getUint32(4, true) + (is64 ? dv.getUint32(0x150, true) * 2 ** 32 : 0);
  const freeBlocksCount = dv.getUint32(12, true) + (is64 ? dv.getUint32(0x158, true) * 2 ** 32 : 0);
  const firstDataBlock = dv.getUint32(20, true);
  const blocksPerGroup = dv.getUint32(32, true);
  let descSize = 32;
  if (is64) {
    descSize = dv.getUint16(0xfe, true);
    if (descSize < 64 || descSize > 1024 || (descSize & (descSize - 1)) !== 0) {
      throw new CorruptFilesystemError(`ext superblock: 64bit feature with s_desc_size ${descSize}, expected a power of two in 64..1024`, { descSize });
    }
  }
  // A group's bitmap is one block: a bit per block, or with bigalloc a bit per cluster.
  const bigalloc = (featureRoCompat & RO_COMPAT.BIGALLOC) !== 0;
  const bitsPerGroup = bigalloc ? dv.getUint32(36, true) : blocksPerGroup;
  if (blocksPerGroup < 8 || blocksPerGroup % 8 !== 0 || bitsPerGroup < 8 || bitsPerGroup > 8 * blockSize) {
    throw new CorruptFilesystemError(
      `ext superblock: ${bigalloc ? `s_clusters_per_group ${bitsPerGroup}` : `s_blocks_per_group ${blocksPerGroup}`} is not in 8..${8 * blockSize} (one bitmap block of ${blockSize} bytes) or not a multiple of 8`,
      { blocksPerGroup, bitsPerGroup, blockSize },
    );
  }
  const expectedFirst = blockSize === 1024 && !bigalloc ? 1 : 0;
  if (firstDataBlock !== expectedFirst) {
    throw new CorruptFilesystemError(
      `ext superblock: s_first_data_block is ${firstDataBlock}, expected ${expectedFirst} for ${blockSize}-byte blocks`,
      { firstDataBlock, blockSize },
    );
  }
  if (blocksCount <= firstDataBlock) {
    throw new CorruptFilesystemError(`ext superblock: s_blocks_count ${blocksCount} leaves no block after s_first_data_block ${firstDataBlock}`, { blocksCount });
  }
  if (freeBlocksCount > blocksCount) {
    throw new CorruptFilesystemError(`ext superblock: ${freeBlocksCount} free blocks of ${blocksCount}`, { freeBlocksCount, blocksCount });
  }
  return {
    blockSize,
    blocksCount,
    freeBlocksCount,
    firstDataBlock,
    blocksPerGroup,
    groupCount: Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup),
    state: dv.getUint16(58, true),
    revLevel,
    featureCompat,
    featureIncompat,
    featureRoCompat,
    descSize,
    reservedGdtBlocks: revLevel === 0 ? 0 : dv.getUint16(0xce, true),
    inodesPerGroup: dv.getUint32(40, true),
    inodeSize: revLevel === 0 ? 128 : dv.getUint16(88, true),
  };
}

/** Why this filesystem's bitmaps cannot be trusted to mean "free", or undefined when they can. */
export function extRefusal(sb: ExtSuperblock): string | undefined {
  if (sb.featureIncompat & INCOMPAT.RECOVER) {
    return 'the journal needs recovery (mounted, or not cleanly unmounted): its bitmaps may be older than the journal';
  }
  if (!(sb.state & STATE_VALID_FS)) return `not cleanly unmounted (s_state 0x${sb.state.toString(16)}); run e2fsck`;
  if (sb.state & STATE_ERROR_FS) return `the kernel recorded errors (s_state 0x${sb.state.toString(16)}); run e2fsck`;
  const incompat = (sb.featureIncompat & ~INCOMPAT_UNDERSTOOD) >>> 0;
  if (incompat) return `incompat features we do not read: ${featureNames(incompat, INCOMPAT_NAMES)}`;
  const roCompat = (sb.featureRoCompat & ~RO_COMPAT_UNDERSTOOD) >>> 0;
  if (roCompat) return `ro_compat features that change what a bitmap bit means: ${featureNames(roCompat, RO_COMPAT_NAMES)}`;
  return undefined;
}

/** The group descriptor table (at least groupCount × descSize bytes). */
export function parseExtGroupDescriptors(buf: Uint8Array, sb: ExtSuperblock): ExtGroupDescriptor[] {
  const bytes = sb.groupCount * sb.descSize;
  if (buf.length < bytes) {
    throw new CorruptFilesystemError(`ext group descriptors: expected ${bytes} bytes for ${sb.groupCount} groups, got ${buf.length}`, {
      bytes,
      got: buf.length,
    });
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const wide = sb.descSize >= 64;
  const out: ExtGroupDescriptor[] = [];
  for (let g = 0; g < sb.groupCount; g++) {
    const at = g * sb.descSize;
    out.push({
      blockBitmap: dv.getUint32(at, true) + (wide ? dv.getUint32(at + 0x20, true) * 2 ** 32 : 0),
      inodeBitmap: dv.getUint32(at + 0x04, true) + (wide ? dv.getUint32(at + 0x24, true) * 2 ** 32 : 0),
      inodeTable: dv.getUint32(at + 0x08, true) + (wide ? dv.getUint32(at + 0x28, true) * 2 ** 32 : 0),
      freeBlocksCount: dv.getUint16(at + 0x0c, true) + (wide ? dv.getUint16(at + 0x2c, true) * 2 ** 16 : 0),
      freeBlocksCountComplete: wide,
      flags: dv.getUint16(at + 0x12, true),
    });
  }
  return out;
}

/** Free (zero) bits among the first `count` bits of `bitmap`. */
function countFreeBits(bitmap: Uint8Array, count: number): number {
  let used = 0;
  const fullBytes = Math.floor(count / 8);
  for (let i = 0; i < fullBytes; i++) used += POPCOUNT[bitmap[i]];
  for (let u = fullBytes * 8; u < count; u++) used += (bitmap[Math.floor(u / 8)] >> (u % 8)) & 1;
  return count - used;
}

const POPCOUNT = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let v = b; v; v >>= 1) n += v & 1;
  return n;
});

/** Free blocks of the ext filesystem occupying `volume` (device bytes) of `dev`. */
export async function readExtAllocation(dev: BlockDevice, volume: ByteRange, options: AllocationOptions = {}): Promise<FsAllocation> {
  const vol: Volume = { dev, range: volume, signal: options.signal };
  const sb = parseExtSuperblock(await readVolume(vol, EXT_SUPERBLOCK_OFFSET, EXT_SUPERBLOCK_SIZE, 'ext superblock'));
  const fsBytes = sb.blocksCount * sb.blockSize;
  if (fsBytes > volume.length) {
    throw new CorruptFilesystemError(
      `ext: ${sb.blocksCount} blocks of ${sb.blockSize} bytes (${fsBytes} bytes) do not fit the volume of ${volume.length} bytes`,
      { blocksCount: sb.blocksCount, blockSize: sb.blockSize, volumeLength: volume.length },
    );
  }
  const refusal = extRefusal(sb);
  if (refusal) throw new UnsupportedFilesystemError(`ext: ${refusal}`, { state: sb.state, incompat: sb.featureIncompat, roCompat: sb.featureRoCompat });

  const gdtBlock = sb.firstDataBlock + 1;
  const groups = parseExtGroupDescriptors(
    await readVolume(vol, gdtBlock * sb.blockSize, sb.groupCount * sb.descSize, 'ext group descriptor table'),
    sb,
  );
  const collector = new FreeRunCollector(volume.offset, sb.blockSize, minUnits(options, sb.blockSize));
  const metadata = groups.some((d) => d.flags & BG_BLOCK_UNINIT) ? metadataByGroup(sb, groups) : null;
  const notes: string[] = [];
  const uninit: number[] = [];
  const mismatched: string[] = [];
  const maxBatch = Math.max(1, Math.floor(MAX_BATCH_BYTES / sb.blockSize));

  for (let g = 0; g < groups.length; ) {
    if (groups[g].flags & BG_BLOCK_UNINIT) {
      // No bitmap was written: as the kernel does, the group's only used blocks are its
      // own backup superblock and descriptors and any group's bitmaps and inode table
      // that flex_bg placed inside it. libext2fs marks every wholly free group so on close.
      const groupStart = sb.firstDataBlock + g * sb.blocksPerGroup;
      const count = Math.min(sb.blocksPerGroup, sb.blocksCount - groupStart);
      const bitmap = metadata ? uninitBitmap(sb, metadata, g, groupStart, count) : null;
      const freeBits = bitmap ? countFreeBits(bitmap, count) : -1;
      if (bitmap && freeBits === groups[g].freeBlocksCount % (groups[g].freeBlocksCountComplete ? Infinity : 65536)) {
        collector.addBitmap(bitmap, groupStart, count);
      } else uninit.push(g);
      g++;
      continue;
    }
    // Groups whose bitmap blocks follow one another (flex_bg packs them) are read at once.
    let n = 1;
    while (
      g + n < groups.length &&
      n < maxBatch &&
      !(groups[g + n].flags & BG_BLOCK_UNINIT) &&
      groups[g + n].blockBitmap === groups[g].blockBitmap + n
    ) {
      n++;
    }
    const first = groups[g].blockBitmap;
    if (first < sb.firstDataBlock || first + n > sb.blocksCount) {
      throw new CorruptFilesystemError(
        `ext: block bitmap of group ${g} is block ${first}, outside the filesystem's blocks ${sb.firstDataBlock}..${sb.blocksCount - 1}`,
        { group: g, blockBitmap: first, blocksCount: sb.blocksCount },
      );
    }
    const batch = await readVolume(vol, first * sb.blockSize, n * sb.blockSize, `ext block bitmap of group ${g}`);
    for (let k = 0; k < n; k++, g++) {
      const groupStart = sb.firstDataBlock + g * sb.blocksPerGroup;
      const count = Math.min(sb.blocksPerGroup, sb.blocksCount - groupStart);
      const bitmap = batch.subarray(k * sb.blockSize, (k + 1) * sb.blockSize);
      const freeBits = countFreeBits(bitmap, count);
      const d = groups[g];
      const agrees = d.freeBlocksCountComplete ? freeBits === d.freeBlocksCount : freeBits % 65536 === d.freeBlocksCount;
      if (!agrees) {
        mismatched.push(`group ${g} (bitmap ${freeBits}, descriptor ${d.freeBlocksCount})`);
        continue;
      }
      collector.addBitmap(bitmap, groupStart, count);
    }
  }
  if (uninit.length > 0) {
    notes.push(`${uninit.length} of ${groups.length} groups are BLOCK_UNINIT and their metadata does not account for their free count; counted as in use`);
  }
  if (mismatched.length > 0) {
    notes.push(`bitmap free count differs from the group descriptor, group counted as in use: ${mismatched.slice(0, 8).join(', ')}${mismatched.length > 8 ? `, and ${mismatched.length - 8} more` : ''}`);
  }
  const free = collector.ranges();
  return {
    fs: 'ext',
    unitSize: sb.blockSize,
    unitCount: sb.blocksCount,
    free,
    freeBytes: collector.freeUnits * sb.blockSize,
    notes,
  };
}

const COMPAT_RESIZE_INODE = 0x0010;
const COMPAT_SPARSE_SUPER2 = 0x0200;

function isPowerOf(n: number, base: number): boolean {
  let v = base;
  while (v < n) v *= base;
  return v === n;
}

/** Does group g hold a backup superblock and descriptor table (sparse_super: 0, 1 and powers of 3, 5, 7)? */
function hasSuperBackup(sb: ExtSuperblock, g: number): boolean {
  if (g === 0 || !(sb.featureRoCompat & RO_COMPAT.SPARSE_SUPER)) return true;
  return g === 1 || isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7);
}

/** Block extents of every group's bitmaps and inode table, filed under the groups they lie in. */
function metadataByGroup(sb: ExtSuperblock, groups: ExtGroupDescriptor[]): Map<number, [number, number][]> | null {
  // sparse_super2 places backups where s_backup_bgs says; not read here, so no synthesis.
  if (sb.featureCompat & COMPAT_SPARSE_SUPER2 || sb.inodeSize < 128 || sb.inodeSize > sb.blockSize) return null;
  const itableBlocks = Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize);
  const byGroup = new Map<number, [number, number][]>();
  const file = (start: number, length: number) => {
    for (let b = start; b < start + length; ) {
      const g = Math.floor((b - sb.firstDataBlock) / sb.blocksPerGroup);
      const groupEnd = sb.firstDataBlock + (g + 1) * sb.blocksPerGroup;
      const n = Math.min(start + length, groupEnd) - b;
      let list = byGroup.get(g);
      if (!list) byGroup.set(g, (list = []));
      list.push([b, n]);
      b += n;
    }
  };
  for (const d of groups) {
    file(d.blockBitmap, 1);
    file(d.inodeBitmap, 1);
    file(d.inodeTable, itableBlocks);
  }
  return byGroup;
}

function uninitBitmap(sb: ExtSuperblock, metadata: Map<number, [number, number][]>, g: number, groupStart: number, count: number): Uint8Array {
  const bitmap = new Uint8Array(Math.ceil(sb.blocksPerGroup / 8));
  const mark = (start: number, length: number) => {
    const from = Math.max(start, groupStart);
    const to = Math.min(start + length, groupStart + count);
    for (let b = from; b < to; b++) {
      const bit = b - groupStart;
      bitmap[bit >> 3]! |= 1 << (bit & 7);
    }
  };
  if (hasSuperBackup(sb, g)) {
    const gdtBlocks = Math.ceil((sb.groupCount * sb.descSize) / sb.blockSize);
    const reserved = sb.featureCompat & COMPAT_RESIZE_INODE ? sb.reservedGdtBlocks : 0;
    mark(groupStart, 1 + gdtBlocks + reserved);
  }
  for (const [start, length] of metadata.get(g) ?? []) mark(start, length);
  return bitmap;
}
