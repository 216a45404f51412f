/**
 * qcow2 writer: creates version 3 images (compat 1.1) and grows existing ones in place.
 *
 * Allocation only ever appends: a new cluster goes at the allocation end (the file's end,
 * cluster-aligned, or past the last cluster with a refcount), so a cluster is never reused
 * and a crash can at worst leak clusters, never hand one out twice. One write call claims all
 * the clusters it needs as one run, so an ascending export writes each request with one
 * file write. All-zero clusters are not stored (or get the zero flag where a backing disk
 * must be hidden).
 *
 * Data goes to the file at once; what points at it (refcounts, L2 entries, L1 entries, a
 * grown refcount table) changes in memory and reaches the file in `flush`, in qemu's order:
 *   sync data · refcount blocks (and a new refcount table) · sync · refcount-table entries
 *   or header · sync · L2 tables · sync (only if L1 changes) · L1 entries · sync ·
 *   refcount decrements for clusters no longer referenced · sync.
 * A crash anywhere leaves every L2 entry pointing at durable, counted data; what can be lost
 * is unreferenced but counted clusters, which qemu-img check reports as leaks (rc 3). A write
 * that leaves more than 64 MiB of metadata dirty flushes, so a huge export stays in bounded
 * memory. Partly written new clusters are completed with their old content (backing disk,
 * inflated compressed cluster) or zeros; compressed clusters are replaced, not rewritten.
 *
 * Refused for writing: images with internal snapshots (shared clusters would need
 * copy-on-write of L2 tables) and dirty images (lazy refcounts not yet repaired).
 *
 * Layout of a new image: header (cluster 0), L1 table sized for the whole virtual disk,
 * refcount table sized for the largest file the disk can grow to (it never moves), then the
 * first refcount block. Images made elsewhere may need their refcount table grown; that is
 * supported (the header switches to the new table only after it is durable).
 */
import { CorruptImageError, UsageError } from '../errors.js';
import type { CreateOptions, DiskWriter, FileOpener } from '../disk-image.js';
import type { RandomAccessFile } from '../types.js';
import { isAllZero } from '../bytes.js';
import {
  HEADER_AUTOCLEAR_AT,
  HEADER_REFCOUNT_TABLE_AT,
  INCOMPAT_DIRTY,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MIN_CLUSTER_BITS,
  assertReadable,
  encodeHeader,
  encodeRefcountTablePointer,
  entryOffset,
  getRefcount,
  l1EntriesFor,
  maxRefcount,
  parseHeader,
  refcountsPerBlock,
  setRefcount,
  writeEntry,
} from './codec.js';
import { Qcow2Layer, openBacking, readHeader, type ClusterState, type L2Table } from './reader.js';

export const DEFAULT_CLUSTER_SIZE = 64 * 1024;
/** Dirty metadata (L2 tables and refcount blocks) beyond this is flushed by the write that passes it. */
const AUTO_FLUSH_BYTES = 64 * 1024 * 1024;
/** Clean refcount blocks kept in memory; each covers clusterSize * 8 / 16 clusters. */
const MAX_CLEAN_BLOCKS = 256;

interface RefBlock {
  host: number;
  buf: Buffer;
  dirty: boolean;
}

/** What one cluster of a write does. */
type Action =
  | { kind: 'inplace'; host: number }
  | { kind: 'alloc'; base: Buffer | null } // new cluster; base: old content for a partial write
  | { kind: 'rewrite'; host: number } // zero-flagged cluster with space: write in place, clear the flag
  | { kind: 'zero' } // set the zero flag (hides the backing disk or a compressed cluster)
  | { kind: 'skip' };

interface Step {
  g: number;
  /** Byte range inside the cluster and where it comes from in the caller's buffer. */
  s: number;
  e: number;
  src: number;
  table: L2Table | null;
  old: ClusterState;
  action: Action;
  host?: number;
}

export class Qcow2Writer implements DiskWriter {
  readonly format = 'qcow2' as const;
  private readonly cs: number;
  private readonly refOrder: number;
  private readonly perBlock: number;
  private readonly blocks = new Map<number, RefBlock>();
  /** The refcount table in memory, where it lives (rtHost) and what the header names (published). */
  private rt: Buffer;
  private rtHost: number;
  private published: { offset: number; clusters: number };
  private rtDirtyLo = Infinity;
  private rtDirtyHi = -1;
  private l1DirtyLo = Infinity;
  private l1DirtyHi = -1;
  /** Next free cluster-aligned file offset. */
  private nextFree: number;
  /** Host clusters to decrement once the L2 entries that stopped using them are durable. */
  private decrements: number[] = [];
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(private readonly layer: Qcow2Layer, rt: Buffer, nextFree: number) {
    const h = layer.header;
    this.cs = h.clusterSize;
    this.refOrder = h.refcountOrder;
    this.perBlock = refcountsPerBlock(h.clusterSize, h.refcountOrder);
    this.rt = rt;
    this.rtHost = h.refcountTableOffset;
    this.published = { offset: h.refcountTableOffset, clusters: h.refcountTableClusters };
    this.nextFree = nextFree;
    layer.fileEnd = Math.max(layer.fileEnd, nextFree);
  }

  get size(): number {
    return this.layer.size;
  }

  get subformat(): string {
    return `v${this.layer.header.version}`;
  }

  private get file(): RandomAccessFile {
    return this.layer.file;
  }

  /** Creates an empty version 3 image of `options.size` bytes in `file`. */
  static async create(file: RandomAccessFile, _opener: FileOpener, options: CreateOptions): Promise<Qcow2Writer> {
    const size = options.size;
    if (!Number.isSafeInteger(size) || size < 0 || size % 512 !== 0) {
      throw new UsageError(`qcow2 virtual size must be a non-negative multiple of 512 bytes, not ${size}`, { size });
    }
    if (options.subformat !== undefined && options.subformat !== 'v3' && options.subformat !== 'qcow2') {
      throw new UsageError(`qcow2 subformat "${options.subformat}" cannot be written; imagekeep writes v3 (compat 1.1)`, { subformat: options.subformat });
    }
    const cs = options.blockSize ?? DEFAULT_CLUSTER_SIZE;
    const bits = Math.log2(cs);
    if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
      throw new UsageError(`qcow2 cluster size must be a power of two from 512 B to 2 MiB, not ${cs}`, { clusterSize: cs });
    }
    const refcountOrder = 4;
    const l1Size = l1EntriesFor(size, bits);
    if (l1Size * 8 > MAX_L1_BYTES) {
      throw new UsageError(`a ${size}-byte qcow2 with ${cs}-byte clusters needs an L1 table of ${l1Size * 8} bytes, above qemu's ${MAX_L1_BYTES}; use larger clusters`, { size, clusterSize: cs });
    }
    const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
    // Size the refcount table for the largest file this disk can become: every guest cluster
    // and every L2 table stored once, plus the header, L1, the table and the refcount blocks.
    const perBlock = refcountsPerBlock(cs, refcountOrder);
    const fixed = 1 + l1Clusters + Math.ceil(size / cs) + l1Size;
    let rtClusters = 1;
    for (;;) {
      const blocks = Math.ceil((fixed + rtClusters) / perBlock) + 1;
      const entries = Math.ceil((fixed + rtClusters + blocks) / perBlock) + 2;
      const need = Math.ceil((entries * 8) / cs);
      if (need <= rtClusters) break;
      rtClusters = need;
    }
    if (rtClusters * cs > MAX_REFCOUNT_TABLE_BYTES) {
      throw new UsageError(`a ${size}-byte qcow2 with ${cs}-byte clusters needs a refcount table of ${rtClusters * cs} bytes, above qemu's ${MAX_REFCOUNT_TABLE_BYTES}; use larger clusters`, { size, clusterSize: cs });
    }
    const l1TableOffset = cs;
    const refcountTableOffset = cs * (1 + l1Clusters);
    const metaEnd = refcountTableOffset + rtClusters * cs;
    const headerBytes = encodeHeader({ clusterBits: bits, size, l1Size, l1TableOffset, refcountTableOffset, refcountTableClusters: rtClusters, refcountOrder });
    const header = parseHeader(headerBytes, Number.MAX_SAFE_INTEGER);
    const layer = new Qcow2Layer(file, header, Buffer.alloc(l1Size * 8), metaEnd, null, options.finalName || file.path);
    const w = new Qcow2Writer(layer, Buffer.alloc(rtClusters * cs), metaEnd);
    // Count the header, L1 and refcount table; this places the refcount blocks after them.
    for (let c = 0; c < metaEnd / cs; c++) await w.incRef(c, true);
    // The L1 table is zeros: extending the file writes it. Header last, once the rest is durable.
    await file.truncate(0);
    await file.truncate(w.nextFree);
    for (const b of w.blocks.values()) {
      await file.write(b.buf, b.host);
      b.dirty = false;
    }
    await file.write(w.rt, refcountTableOffset);
    w.rtDirtyLo = Infinity;
    w.rtDirtyHi = -1;
    await file.flush();
    await file.write(headerBytes, 0);
    await file.flush();
    return w;
  }

  /** Opens an existing qcow2 (v2 or v3) to write into it. */
  static async openWritable(file: RandomAccessFile, opener: FileOpener): Promise<Qcow2Writer> {
    const name = file.path;
    const { header: h, fileSize } = await readHeader(file);
    assertReadable(h, name);
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) {
      throw new UsageError(`${name} is marked dirty (qemu stopped while using lazy refcounts), so its refcounts cannot be trusted for writing; run qemu-img check -r all on it first`);
    }
    if (h.nbSnapshots > 0) {
      throw new UsageError(`${name} has ${h.nbSnapshots} internal snapshot(s); imagekeep writes only images without snapshots: delete them with qemu-img snapshot -d, or write a copy`, { snapshots: h.nbSnapshots });
    }
    const backing = await openBacking(h, name, opener, 0);
    try {
      const layer = await Qcow2Layer.load(file, h, fileSize, backing, name);
      const rt = Buffer.alloc(h.refcountTableClusters * h.clusterSize); // bounded by parseHeader (8 MiB, inside the file)
      await file.read(rt, h.refcountTableOffset);
      const cs = h.clusterSize;
      const w = new Qcow2Writer(layer, rt, Math.ceil(fileSize / cs) * cs);
      // Clusters past the end of the file may already be counted (a crash between a refcount
      // write and the write of the L2 table it counts): start allocating after the last one.
      const lastUsed = await w.lastCountedCluster();
      w.nextFree = Math.max(w.nextFree, (lastUsed + 1) * cs);
      layer.fileEnd = Math.max(layer.fileEnd, w.nextFree);
      if (h.version >= 3 && h.autoclearFeatures !== 0n) {
        // Autoclear bits vouch for data we do not maintain (persistent bitmaps): clear them
        // before the first write, as qcow2.txt requires of programs that do not update it.
        await file.write(Buffer.alloc(8), HEADER_AUTOCLEAR_AT);
        await file.flush();
      }
      return w;
    } catch (e) {
      if (backing) await backing.close().catch(() => undefined);
      throw e;
    }
  }

  /** Index of the highest cluster with a non-zero refcount (-1 if none). */
  private async lastCountedCluster(): Promise<number> {
    for (let r = this.rt.length / 8 - 1; r >= 0; r--) {
      if (this.rtEntry(r) === 0) continue;
      const b = await this.block(r);
      for (let i = this.perBlock - 1; i >= 0; i--) {
        if (getRefcount(b.buf, i, this.refOrder) !== 0) return r * this.perBlock + i;
      }
    }
    return -1;
  }

  private rtEntry(r: number): number {
    const hi = this.rt.readUInt32BE(r * 8);
    const lo = this.rt.readUInt32BE(r * 8 + 4);
    const host = entryOffset(hi, lo);
    if (host !== 0 && (hi >= 0x200000 || lo % 512 !== 0 || host % this.cs !== 0 || host >= this.layer.fileEnd)) {
      throw new CorruptImageError(`${this.layer.name}: refcount table entry ${r} points at ${host}, not a cluster inside the file (${this.layer.fileEnd} bytes); repair with qemu-img check -r all`, { index: r, host });
    }
    return host;
  }

  private setRtEntry(r: number, host: number): void {
    writeEntry(this.rt, r, host, false);
    this.rtDirtyLo = Math.min(this.rtDirtyLo, r);
    this.rtDirtyHi = Math.max(this.rtDirtyHi, r);
  }

  /** Refcount block `r`, loaded or created (a new block is counted like any new cluster). */
  private async block(r: number): Promise<RefBlock> {
    const cached = this.blocks.get(r);
    if (cached) return cached;
    if (r >= this.rt.length / 8) {
      await this.growTable(r);
      // Counting the new table's clusters may have created this very block.
      const made = this.blocks.get(r);
      if (made) return made;
    }
    const host = this.rtEntry(r);
    if (host !== 0) {
      const buf = Buffer.alloc(this.cs);
      await this.file.read(buf, host);
      const b = { host, buf, dirty: false };
      this.blocks.set(r, b);
      this.trimBlocks();
      return b;
    }
    const b = { host: this.claim(1), buf: Buffer.alloc(this.cs), dirty: true };
    this.blocks.set(r, b);
    this.setRtEntry(r, b.host);
    await this.incRef(b.host / this.cs, true);
    return b;
  }

  private trimBlocks(): void {
    if (this.blocks.size <= MAX_CLEAN_BLOCKS) return;
    for (const [r, b] of this.blocks) {
      if (this.blocks.size <= MAX_CLEAN_BLOCKS) break;
      if (!b.dirty) this.blocks.delete(r);
    }
  }

  /** Reserves `n` clusters at the allocation end without counting them. */
  private claim(n: number): number {
    const at = this.nextFree;
    this.nextFree += n * this.cs;
    this.layer.fileEnd = Math.max(this.layer.fileEnd, this.nextFree);
    return at;
  }

  /** Adds one reference to cluster `c`; `fresh` clusters must have had none. */
  private async incRef(c: number, fresh: boolean): Promise<void> {
    const b = await this.block(Math.floor(c / this.perBlock));
    const i = c % this.perBlock;
    const v = getRefcount(b.buf, i, this.refOrder);
    if (fresh && v !== 0) {
      throw new CorruptImageError(`${this.layer.name}: cluster ${c} (offset ${c * this.cs}) lies past the allocation end yet has refcount ${v}; repair with qemu-img check -r all`, { cluster: c, refcount: v });
    }
    if (v >= maxRefcount(this.refOrder)) {
      throw new CorruptImageError(`${this.layer.name}: cluster ${c} already has the largest refcount ${v}`, { cluster: c });
    }
    setRefcount(b.buf, i, this.refOrder, v + 1);
    b.dirty = true;
  }

  private async decRef(c: number): Promise<void> {
    const b = await this.block(Math.floor(c / this.perBlock));
    const i = c % this.perBlock;
    const v = getRefcount(b.buf, i, this.refOrder);
    if (v === 0) {
      throw new CorruptImageError(`${this.layer.name}: cluster ${c} (offset ${c * this.cs}) is in use but has refcount 0; repair with qemu-img check -r all`, { cluster: c });
    }
    setRefcount(b.buf, i, this.refOrder, v - 1);
    b.dirty = true;
  }

  /**
   * Makes room for refcount-table entry `r`: a bigger table at the allocation end, covering
   * itself and the blocks it may need. The header names it only at the next flush; a table
   * grown twice before that frees the unpublished one at once.
   */
  private async growTable(r: number): Promise<void> {
    const cs = this.cs;
    const oldEntries = this.rt.length / 8;
    let entries = Math.max(oldEntries * 2, r + 1);
    for (;;) {
      const clusters = Math.ceil((entries * 8) / cs);
      const reach = this.nextFree / cs + clusters + 8; // the table and a few blocks after it
      if (entries * this.perBlock > reach) break;
      entries = Math.ceil(reach / this.perBlock) + 1;
    }
    const clusters = Math.ceil((entries * 8) / cs);
    if (clusters * cs > MAX_REFCOUNT_TABLE_BYTES) {
      throw new UsageError(`${this.layer.name}: its refcount table would grow to ${clusters * cs} bytes, above qemu's ${MAX_REFCOUNT_TABLE_BYTES}; the image cannot grow further with ${cs}-byte clusters`);
    }
    const bigger = Buffer.alloc(clusters * cs);
    this.rt.copy(bigger);
    const unpublished = this.rtHost !== this.published.offset ? { host: this.rtHost, clusters: this.rt.length / cs } : null;
    this.rt = bigger;
    this.rtHost = this.claim(clusters);
    for (let c = 0; c < clusters; c++) await this.incRef(this.rtHost / cs + c, true);
    if (unpublished) for (let c = 0; c < unpublished.clusters; c++) await this.decRef(unpublished.host / cs + c);
  }

  private markL1(i: number): void {
    this.l1DirtyLo = Math.min(this.l1DirtyLo, i);
    this.l1DirtyHi = Math.max(this.l1DirtyHi, i);
  }

  /** The L2 table for `l1Index`, created (in memory, counted) when the L1 entry is empty. */
  private async table(l1Index: number): Promise<L2Table> {
    const t = await this.layer.l2(l1Index);
    if (t) {
      // Dirty from now on: a dirty table stays in the cache, so the entries this write is
      // about to change cannot be evicted and reloaded stale.
      t.dirty = true;
      return t;
    }
    const host = this.claim(1);
    await this.incRef(host / this.cs, true);
    const made: L2Table = { host, buf: Buffer.alloc(this.cs), dirty: true };
    this.layer.remember(l1Index, made);
    writeEntry(this.layer.l1, l1Index, host, true);
    this.markL1(l1Index);
    return made;
  }

  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(() => {
      if (this.closed) throw new UsageError(`${this.layer.name}: the qcow2 writer is closed`);
      return fn();
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  write(from: Uint8Array, at: number): Promise<void> {
    return this.locked(() => this.doWrite(from, at));
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.locked(() => this.layer.read(into, at));
  }

  flush(): Promise<void> {
    return this.locked(() => this.doFlush());
  }

  async close(): Promise<void> {
    await this.locked(async () => {
      await this.doFlush();
      this.closed = true;
    });
    await this.layer.close();
  }

  async abort(): Promise<void> {
    await this.queue;
    this.closed = true;
    await this.layer.close();
  }

  private async doWrite(from: Uint8Array, at: number): Promise<void> {
    const size = this.size;
    const end = at + from.length;
    if (!Number.isSafeInteger(at) || at < 0 || at % 512 !== 0 || (from.length % 512 !== 0 && end !== size) || end > size) {
      throw new UsageError(`${this.layer.name}: write of ${from.length} bytes at ${at} must be 512-aligned and inside the virtual size ${size}`, { at, length: from.length, size });
    }
    if (from.length === 0) return;
    const cs = this.cs;
    const v3 = this.layer.header.version >= 3;
    const hasBacking = this.layer.backing !== null;

    // Plan each cluster; L2 tables are created here, before the data run is claimed, so the
    // new data clusters of this call end up contiguous in the file.
    const steps: Step[] = [];
    let pos = at;
    while (pos < end) {
      const g = Math.floor(pos / cs);
      const gStart = g * cs;
      const s = pos - gStart;
      const e = Math.min(cs, end - gStart);
      const l1Index = Math.floor(g / this.layer.l2Entries);
      let table = await this.layer.l2(l1Index);
      const old = this.layer.state(table, g % this.layer.l2Entries, gStart);
      const data = from.subarray(pos - at, pos - at + (e - s));
      // The whole guest part of the cluster: the last cluster of a disk may be short.
      const whole = s === 0 && (e === cs || gStart + e === size);
      let action: Action;
      if (old.kind === 'data') {
        action = { kind: 'inplace', host: old.host };
      } else {
        const zeros = isAllZero(data);
        if (old.kind === 'zero') {
          if (zeros) action = { kind: 'skip' };
          else if (old.host !== 0) action = { kind: 'rewrite', host: old.host };
          else action = { kind: 'alloc', base: null };
        } else if (old.kind === 'unallocated') {
          if (zeros && !hasBacking) action = { kind: 'skip' };
          else if (zeros && whole && v3) action = { kind: 'zero' };
          else action = { kind: 'alloc', base: whole || !hasBacking ? null : await this.layer.readCluster(g) };
        } else {
          // Compressed: a new cluster replaces it (copy-on-write); its old sectors are released at flush.
          if (zeros && whole && v3) action = { kind: 'zero' };
          else action = { kind: 'alloc', base: whole ? null : await this.layer.readCluster(g) };
        }
        if (action.kind === 'alloc' || action.kind === 'zero') table = await this.table(l1Index);
      }
      steps.push({ g, s, e, src: pos - at, table, old, action });
      pos = gStart + e;
    }

    // One run of new clusters for the whole call.
    const allocs = steps.filter((st) => st.action.kind === 'alloc');
    if (allocs.length > 0) {
      const first = this.claim(allocs.length);
      for (let i = 0; i < allocs.length; i++) {
        allocs[i].host = first + i * cs;
        await this.incRef(first / cs + i, true);
      }
    }

    // Data: merge what is contiguous both in the file and in the caller's buffer.
    let seg: { at: number; src: number; length: number } | null = null;
    const flushSeg = async () => {
      if (seg) await this.file.write(from.subarray(seg.src, seg.src + seg.length), seg.at);
      seg = null;
    };
    for (const st of steps) {
      const a = st.action;
      if (a.kind === 'skip' || a.kind === 'zero') continue;
      const host = a.kind === 'alloc' ? (st.host as number) : a.host;
      const full = st.s === 0 && st.e === cs;
      if (a.kind === 'inplace' || full) {
        const target = host + st.s;
        const length = st.e - st.s;
        if (seg && seg.at + seg.length === target && seg.src + seg.length === st.src) seg.length += length;
        else {
          await flushSeg();
          seg = { at: target, src: st.src, length };
        }
        continue;
      }
      // A new or rewritten cluster only partly covered: complete it with its old content
      // (backing data, inflated compressed data) or zeros, so no stale bytes become visible.
      await flushSeg();
      const buf = a.kind === 'alloc' && a.base ? a.base : Buffer.alloc(cs);
      buf.set(from.subarray(st.src, st.src + (st.e - st.s)), st.s);
      await this.file.write(buf, host);
    }
    await flushSeg();

    // Metadata, in memory only until flush.
    for (const st of steps) {
      const a = st.action;
      if (a.kind === 'skip' || a.kind === 'inplace') continue;
      const table = st.table as L2Table;
      const j = st.g % this.layer.l2Entries;
      if (a.kind === 'zero') writeEntry(table.buf, j, 0, false, true);
      else writeEntry(table.buf, j, a.kind === 'alloc' ? (st.host as number) : a.host, true);
      table.dirty = true;
      if (st.old.kind === 'compressed') {
        const first = Math.floor(st.old.offset / cs);
        const last = Math.floor((st.old.offset + st.old.length - 1) / cs);
        for (let c = first; c <= last; c++) this.decrements.push(c);
      }
    }
    if (this.dirtyBytes() > AUTO_FLUSH_BYTES) await this.doFlush();
  }

  private dirtyBytes(): number {
    let n = 0;
    for (const [, t] of this.layer.dirtyTables()) n += t.buf.length;
    for (const b of this.blocks.values()) if (b.dirty) n += b.buf.length;
    return n;
  }

  private async writeDirtyBlocks(): Promise<boolean> {
    const dirty = [...this.blocks.values()].filter((b) => b.dirty).sort((a, b) => a.host - b.host);
    for (const b of dirty) await this.file.write(b.buf, b.host);
    for (const b of dirty) b.dirty = false;
    return dirty.length > 0;
  }

  private async doFlush(): Promise<void> {
    const file = this.file;
    await file.flush(); // the data every new entry will point at is durable first
    const tables = this.layer.dirtyTables().sort((a, b) => a[1].host - b[1].host);
    const moved = this.rtHost !== this.published.offset;
    const rtDirty = this.rtDirtyHi >= 0;
    const l1Dirty = this.l1DirtyHi >= 0;
    const anyBlocks = [...this.blocks.values()].some((b) => b.dirty);
    if (!anyBlocks && !moved && !rtDirty && tables.length === 0 && !l1Dirty && this.decrements.length === 0) return;

    // 1. Refcounts (new blocks are not yet reachable; a moved table is not yet named).
    let wrote = await this.writeDirtyBlocks();
    if (moved) {
      await file.write(this.rt, this.rtHost);
      wrote = true;
    }
    if (wrote) await file.flush();

    // 2. Make new blocks reachable: table entries in place, or the header switches tables.
    if (moved) {
      const old = this.published;
      const clusters = this.rt.length / this.cs;
      await file.write(encodeRefcountTablePointer(this.rtHost, clusters), HEADER_REFCOUNT_TABLE_AT);
      await file.flush();
      this.published = { offset: this.rtHost, clusters };
      for (let c = 0; c < old.clusters; c++) this.decrements.push(old.offset / this.cs + c);
    } else if (rtDirty) {
      const lo = this.rtDirtyLo * 8;
      const hi = (this.rtDirtyHi + 1) * 8;
      await file.write(this.rt.subarray(lo, hi), this.rtHost + lo);
      await file.flush();
    }
    this.rtDirtyLo = Infinity;
    this.rtDirtyHi = -1;

    // 3. L2 tables, then (once they are durable) the L1 entries naming new ones.
    for (const [, t] of tables) await file.write(t.buf, t.host);
    for (const [, t] of tables) t.dirty = false;
    if (l1Dirty) {
      if (tables.length > 0) await file.flush();
      const lo = this.l1DirtyLo * 8;
      const hi = (this.l1DirtyHi + 1) * 8;
      await file.write(this.layer.l1.subarray(lo, hi), this.layer.header.l1TableOffset + lo);
      this.l1DirtyLo = Infinity;
      this.l1DirtyHi = -1;
    }
    if (tables.length > 0 || l1Dirty) await file.flush();

    // 4. Release what nothing points at any more (compressed clusters replaced, an old table).
    if (this.decrements.length > 0) {
      const list = this.decrements;
      this.decrements = [];
      for (const c of list) await this.decRef(c);
      await this.writeDirtyBlocks();
      await file.flush();
    }
    this.trimBlocks();
  }
}
