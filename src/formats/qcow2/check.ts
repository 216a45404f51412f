/**
 * Our own qcow2 structure check, the same idea as `qemu-img check`: every host cluster the
 * metadata reaches (header, L1, refcount table and blocks, L2 tables, data, compressed
 * sectors, snapshot tables and their L1/L2, bitmap directory and tables, LUKS header) is
 * counted, and the counts are compared with the stored refcounts. A stored refcount above
 * the count is a leak (wasted space, harmless); below it, a corruption (a write could reuse a
 * cluster still in use). Also: entries unaligned, with reserved bits or pointing outside the
 * file, a cluster used twice, and the COPIED flag (bit 63) disagreeing with the refcount.
 *
 * Memory stays proportional to what the image uses: 2 bytes of count per host cluster in
 * 64 Ki-cluster chunks made on demand (as qemu-img check), the refcount table (at most 8 MiB),
 * and one L2 table or refcount block at a time.
 */
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import type { FileOpener, StructureReport } from '../disk-image.js';
import type { RandomAccessFile } from '../types.js';
import {
  HI_COMPRESSED,
  HI_COPIED,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  L2_RESERVED_HI,
  L2_RESERVED_LO,
  LO_ZERO,
  decodeCompressed,
  entryOffset,
  getRefcount,
  parseSnapshotTable,
  readU64,
  refcountsPerBlock,
  type Qcow2Header,
} from './codec.js';
import { readHeader } from './reader.js';

/** Problem sentences kept per kind; the rest are counted. */
const MAX_LISTED = 20;
/** qemu's limit for the snapshot table. */
const MAX_SNAPSHOT_TABLE = 64 * 1024 * 1024;
const CHUNK = 65536;

export interface Qcow2CheckReport extends StructureReport {
  /** Clusters whose stored refcount is above the references found (qemu-img check: leaks, rc 3). */
  leaks: number;
  /** Everything else found wrong (qemu-img check: corruptions, rc 2). */
  corruptions: number;
}

/**
 * References per host cluster, 15 bits of count (saturating) and a top bit for "used by
 * something that may not be shared" (anything but compressed data), in chunks of 64 Ki
 * clusters made when first touched: 2 bytes per cluster in use, as in qemu-img check.
 */
class ClusterCounts {
  private readonly chunks = new Map<number, Uint16Array>();
  maxIndex = -1;
  add(c: number, exclusive: boolean): void {
    const k = Math.floor(c / CHUNK);
    let chunk = this.chunks.get(k);
    if (!chunk) {
      chunk = new Uint16Array(CHUNK);
      this.chunks.set(k, chunk);
    }
    if (c > this.maxIndex) this.maxIndex = c;
    const v = chunk[c % CHUNK];
    const n = Math.min((v & 0x7fff) + 1, 0x7fff);
    chunk[c % CHUNK] = n | (v & 0x8000) | (exclusive ? 0x8000 : 0);
  }
  has(k: number): boolean {
    return this.chunks.has(k);
  }
  /** References to cluster `c`. */
  get(c: number): number {
    const chunk = this.chunks.get(Math.floor(c / CHUNK));
    return chunk ? chunk[c % CHUNK] & 0x7fff : 0;
  }
  exclusive(c: number): boolean {
    const chunk = this.chunks.get(Math.floor(c / CHUNK));
    return chunk ? (chunk[c % CHUNK] & 0x8000) !== 0 : false;
  }
}

class Findings {
  private corruptList: string[] = [];
  private leakList: string[] = [];
  corruptions = 0;
  leaks = 0;
  corrupt(sentence: string): void {
    this.corruptions++;
    if (this.corruptList.length < MAX_LISTED) this.corruptList.push(sentence);
  }
  leak(sentence: string): void {
    this.leaks++;
    if (this.leakList.length < MAX_LISTED) this.leakList.push(sentence);
  }
  sentences(): string[] {
    const out = [...this.corruptList];
    if (this.corruptions > this.corruptList.length) out.push(`... and ${this.corruptions - this.corruptList.length} more corruptions`);
    out.push(...this.leakList);
    if (this.leaks > this.leakList.length) out.push(`... and ${this.leaks - this.leakList.length} more leaked clusters`);
    if (this.leaks > 0) out.push(`${this.leaks} leaked cluster(s) in all: space is wasted but data is safe (qemu-img check -r leaks reclaims it)`);
    return out;
  }
}

const hex = (hi: number, lo: number) => `0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')}`;

/** Checks the qcow2 in `file`. Throws ForeignFormatError for a file that is not qcow2 at all. */
export async function checkQcow2(file: RandomAccessFile, _opener?: FileOpener): Promise<Qcow2CheckReport> {
  let h: Qcow2Header;
  let fileSize: number;
  try {
    ({ header: h, fileSize } = await readHeader(file));
  } catch (e) {
    if (e instanceof ForeignFormatError) throw e;
    if (e instanceof CorruptImageError || e instanceof UnsupportedVersionError || e instanceof RangeError) {
      return { problems: [e.message], layout: {}, leaks: 0, corruptions: 1 };
    }
    throw e;
  }
  const cs = h.clusterSize;
  const f = new Findings();
  const counts = new ClusterCounts();
  const fileClusters = Math.ceil(fileSize / cs);
  const layout: Record<string, number | string | boolean> = {
    version: h.version,
    virtualSize: h.size,
    clusterSize: cs,
    fileSize,
    l1Size: h.l1Size,
    l1TableOffset: h.l1TableOffset,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    refcountBits: 2 ** h.refcountOrder,
    snapshots: h.nbSnapshots,
    encrypted: h.cryptMethod !== 0,
    compressionType: h.compressionType === 1 ? 'zstd' : 'zlib',
    backingFile: h.backingFile ?? '',
    backingFormat: h.backingFormat ?? '',
  };
  const done = (): Qcow2CheckReport => {
    layout.leakedClusters = f.leaks;
    layout.corruptions = f.corruptions;
    return { problems: f.sentences(), layout, leaks: f.leaks, corruptions: f.corruptions };
  };

  if (h.cryptMethod > 2) f.corrupt(`crypt_method is ${h.cryptMethod}; only 0 (none), 1 (AES) and 2 (LUKS) exist`);
  if ((h.cryptMethod === 2) !== (h.cryptoHeader !== null)) {
    f.corrupt(`crypt_method is ${h.cryptMethod} but the LUKS header extension is ${h.cryptoHeader ? 'present' : 'absent'}; it must be present exactly for LUKS`);
  }
  if (h.incompatibleFeatures & INCOMPAT_CORRUPT) f.corrupt('the image is marked corrupt by qemu (incompatible feature bit 1); repair with qemu-img check -r all');
  if (h.incompatibleFeatures & INCOMPAT_DIRTY) f.corrupt('the image is marked dirty (lazy refcounts were in use when qemu stopped); refcounts may be stale until qemu-img check -r all');
  const unknown = h.incompatibleFeatures & ~0x1fn;
  if (unknown) f.corrupt(`unknown incompatible feature bits 0x${unknown.toString(16)} are set`);
  if (h.incompatibleFeatures & (INCOMPAT_DATA_FILE | INCOMPAT_EXTL2)) {
    f.corrupt('the image uses an external data file or extended L2 entries; imagekeep does not check those layouts (use qemu-img check)');
    return done();
  }

  /** Counts the clusters of [offset, offset + length); `shared` for compressed data. */
  const mark = (offset: number, length: number, what: string, shared = false) => {
    if (length <= 0) return;
    if (offset >= fileSize) {
      f.corrupt(`${what} at ${offset} lies past the end of the file (${fileSize} bytes)`);
      return;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    for (let c = first; c <= last; c++) counts.add(c, !shared);
  };

  // The refcount table (at most 8 MiB), and where each block is; blocks are read later, one at a time.
  mark(0, cs, 'header');
  mark(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
  mark(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');
  const rt = Buffer.alloc(h.refcountTableClusters * cs); // bounded by parseHeader (8 MiB, inside the file)
  await file.read(rt, h.refcountTableOffset);
  const perBlock = refcountsPerBlock(cs, h.refcountOrder);
  const blockAt = new Map<number, number>();
  for (let r = 0; r < rt.length / 8; r++) {
    const hi = rt.readUInt32BE(r * 8);
    const lo = rt.readUInt32BE(r * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    const host = entryOffset(hi, lo);
    if (hi >= 0x1000000 || lo % 512 !== 0 || host % cs !== 0 || host >= fileSize || host === 0) {
      f.corrupt(`refcount table entry ${r} (${hex(hi, lo)}) is not a cluster inside the file (${fileSize} bytes)`);
      continue;
    }
    mark(host, cs, `refcount block ${r}`);
    blockAt.set(r, host);
  }
  const readBlock = async (r: number): Promise<Buffer | null> => {
    const host = blockAt.get(r);
    if (host === undefined) return null;
    const buf = Buffer.alloc(cs);
    await file.read(buf.subarray(0, Math.min(cs, fileSize - host)), host);
    return buf;
  };

  const stats = { l2Tables: 0, dataClusters: 0, compressedClusters: 0, zeroClusters: 0 };
  const activeL2: { index: number; host: number; copied: boolean }[] = [];
  const l2buf = Buffer.alloc(cs);

  /** Walks one L1 table and its L2 tables; the active one also has its COPIED flags checked. */
  const walkL1 = async (l1Offset: number, l1Size: number, label: string, active: boolean) => {
    if (l1Size * 8 > 32 * 1024 * 1024 || l1Offset % cs !== 0 || l1Offset + l1Size * 8 > fileSize) {
      f.corrupt(`${label} L1 table (${l1Size} entries at ${l1Offset}) is unaligned, too large or outside the file (${fileSize} bytes)`);
      return;
    }
    const l1 = Buffer.alloc(l1Size * 8);
    if (l1.length > 0) await file.read(l1, l1Offset);
    const l2Entries = cs / 8;
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      const l2 = entryOffset(hi, lo);
      if (l2 === 0) continue;
      if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0 || l2 % cs !== 0 || l2 >= fileSize) {
        f.corrupt(`${label} L1 entry ${i} (${hex(hi, lo)}) has reserved bits set or does not point at a cluster inside the file (${fileSize} bytes)`);
        continue;
      }
      mark(l2, cs, `L2 table of ${label} L1 entry ${i}`);
      if (active) {
        stats.l2Tables++;
        activeL2.push({ index: i, host: l2, copied: (hi & HI_COPIED) !== 0 });
      }
      l2buf.fill(0);
      await file.read(l2buf.subarray(0, Math.min(cs, fileSize - l2)), l2);
      for (let j = 0; j < l2Entries; j++) {
        const ehi = l2buf.readUInt32BE(j * 8);
        const elo = l2buf.readUInt32BE(j * 8 + 4);
        if (ehi === 0 && elo === 0) continue;
        const guest = (i * l2Entries + j) * cs;
        if (ehi & HI_COMPRESSED) {
          const c = decodeCompressed(ehi, elo, h.clusterBits);
          if (active) stats.compressedClusters++;
          if (active && ehi & HI_COPIED) f.corrupt(`L2 entry for guest offset ${guest}: a compressed cluster must not have the COPIED flag (${hex(ehi, elo)})`);
          if (c.offset < cs) f.corrupt(`L2 entry for guest offset ${guest}: compressed data at ${c.offset} overlaps the header`);
          else mark(c.offset, Math.min(c.length, fileSize - c.offset), `compressed cluster for guest offset ${guest}`, true);
          continue;
        }
        const host = entryOffset(ehi, elo);
        const zero = h.version >= 3 && (elo & LO_ZERO) !== 0;
        if ((ehi & L2_RESERVED_HI) !== 0 || (elo & L2_RESERVED_LO) !== 0 || (h.version < 3 && elo & LO_ZERO)) {
          f.corrupt(`L2 entry for guest offset ${guest} (${hex(ehi, elo)}) has reserved bits set`);
        }
        if (active && zero) stats.zeroClusters++;
        if (host === 0) {
          if (ehi & HI_COPIED) f.corrupt(`L2 entry for guest offset ${guest} (${hex(ehi, elo)}) has the COPIED flag but no cluster`);
          continue;
        }
        if (host % cs !== 0) {
          f.corrupt(`L2 entry for guest offset ${guest} points at ${host}, not aligned to the cluster size ${cs}`);
          continue;
        }
        if (active && !zero) stats.dataClusters++;
        mark(host, cs, `data cluster for guest offset ${guest}`);
      }
    }
  };

  await walkL1(h.l1TableOffset, h.l1Size, 'active', true);

  // Snapshots: their table and their own L1/L2 tables hold references too.
  if (h.nbSnapshots > 0) {
    const n = Math.min(MAX_SNAPSHOT_TABLE, fileSize - h.snapshotsOffset);
    const table = Buffer.alloc(n);
    await file.read(table, h.snapshotsOffset);
    try {
      const { entries, bytes } = parseSnapshotTable(table, h.nbSnapshots);
      mark(h.snapshotsOffset, bytes, 'snapshot table');
      for (const s of entries) {
        const label = `snapshot "${s.name}"`;
        mark(s.l1TableOffset, s.l1Size * 8, `${label} L1 table`);
        await walkL1(s.l1TableOffset, s.l1Size, label, false);
      }
    } catch (e) {
      if (!(e instanceof CorruptImageError)) throw e;
      f.corrupt(e.message);
    }
  }

  // Persistent bitmaps: directory, bitmap tables, bitmap data clusters.
  if (h.bitmaps && h.bitmaps.directorySize > 0) {
    const { directoryOffset, directorySize } = h.bitmaps;
    if (directoryOffset % cs !== 0 || directoryOffset + directorySize > fileSize || directorySize > MAX_SNAPSHOT_TABLE) {
      f.corrupt(`bitmap directory (${directorySize} bytes at ${directoryOffset}) is unaligned or outside the file`);
    } else {
      mark(directoryOffset, directorySize, 'bitmap directory');
      const dir = Buffer.alloc(directorySize);
      await file.read(dir, directoryOffset);
      let at = 0;
      for (let i = 0; i < h.bitmaps.count && at + 24 <= dir.length; i++) {
        const tableOffset = readU64(dir, at);
        const tableSize = dir.readUInt32BE(at + 8);
        const nameSize = dir.readUInt16BE(at + 18);
        const extra = dir.readUInt32BE(at + 20);
        at = Math.ceil((at + 24 + extra + nameSize) / 8) * 8;
        if (tableOffset % cs !== 0 || tableOffset + tableSize * 8 > fileSize) {
          f.corrupt(`bitmap ${i} table (${tableSize} entries at ${tableOffset}) is unaligned or outside the file`);
          continue;
        }
        mark(tableOffset, tableSize * 8, `bitmap ${i} table`);
        const bt = Buffer.alloc(tableSize * 8);
        await file.read(bt, tableOffset);
        for (let k = 0; k < tableSize; k++) {
          const host = entryOffset(bt.readUInt32BE(k * 8), bt.readUInt32BE(k * 8 + 4));
          if (host !== 0) mark(host, cs, `bitmap ${i} data cluster`);
        }
      }
    }
  }

  if (h.cryptoHeader) mark(h.cryptoHeader.offset, h.cryptoHeader.length, 'LUKS header');

  // Counted versus stored, one refcount block at a time; stretches with nothing stored and
  // nothing counted are skipped.
  let highest = counts.maxIndex;
  for (const r of blockAt.keys()) highest = Math.max(highest, (r + 1) * perBlock - 1);
  const lastBlock = Math.floor(highest / perBlock);
  for (let r = 0; r <= lastBlock; r++) {
    const firstChunk = Math.floor((r * perBlock) / CHUNK);
    const lastChunk = Math.floor(((r + 1) * perBlock - 1) / CHUNK);
    let anyCounted = false;
    for (let k = firstChunk; k <= lastChunk && !anyCounted; k++) anyCounted = counts.has(k);
    if (!blockAt.has(r) && !anyCounted) continue;
    const b = await readBlock(r);
    for (let i = 0; i < perBlock; i++) {
      const c = r * perBlock + i;
      const want = anyCounted ? counts.get(c) : 0;
      const have = b ? getRefcount(b, i, h.refcountOrder) : 0;
      if (want > have) {
        f.corrupt(`cluster ${c} (offset ${c * cs}) is referenced ${want} time(s) but its refcount is ${have}`);
      } else if (have > want) {
        f.leak(`cluster ${c} (offset ${c * cs}) has refcount ${have} but ${want} reference(s)${c >= fileClusters ? ' (past the end of the file)' : ''}`);
      }
      if (want > 1 && h.nbSnapshots === 0 && counts.exclusive(c)) {
        f.corrupt(`cluster ${c} (offset ${c * cs}) is used ${want} times although the image has no snapshots`);
      }
    }
  }

  // COPIED (bit 63) says "refcount is exactly one"; checked against the references counted,
  // which must equal the stored refcounts or a problem was reported above.
  for (const t of activeL2) {
    const refs = counts.get(t.host / cs);
    if (t.copied !== (refs === 1)) f.corrupt(`L1 entry ${t.index}: COPIED flag is ${t.copied ? 'set' : 'clear'} but the L2 table at ${t.host} is used ${refs} time(s)`);
    l2buf.fill(0);
    await file.read(l2buf.subarray(0, Math.min(cs, fileSize - t.host)), t.host);
    for (let j = 0; j < cs / 8; j++) {
      const ehi = l2buf.readUInt32BE(j * 8);
      const elo = l2buf.readUInt32BE(j * 8 + 4);
      if (ehi & HI_COMPRESSED) continue;
      const host = entryOffset(ehi, elo);
      if (host === 0 || host % cs !== 0 || host >= fileSize) continue;
      const n = counts.get(host / cs);
      const copied = (ehi & HI_COPIED) !== 0;
      if (copied !== (n === 1)) f.corrupt(`L2 entry for guest offset ${(t.index * (cs / 8) + j) * cs}: COPIED flag is ${copied ? 'set' : 'clear'} but the cluster at ${host} is used ${n} time(s)`);
    }
  }

  layout.l2Tables = stats.l2Tables;
  layout.allocatedClusters = stats.dataClusters;
  layout.compressedClusters = stats.compressedClusters;
  layout.zeroClusters = stats.zeroClusters;
  layout.refcountBlocks = blockAt.size;
  return done();
}
