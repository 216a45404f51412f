/**
 * qcow2 reader: the active L1 table in memory, L2 tables loaded on demand into a bounded
 * cache, and a read path that turns one request into few file reads: consecutive guest
 * clusters stored back to back in the file become one read, clusters that read as zeros are
 * filled in memory, unallocated clusters come from the backing disk (one read per run),
 * compressed clusters are inflated one at a time (the last one is cached, since a reader
 * going forward in small steps asks for the same cluster again).
 *
 * The same layer serves the writer (writer.ts), which changes L1/L2 entries in memory and
 * marks tables dirty; dirty tables are never evicted.
 */
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import zstdBinding from 'zstd-napi/binding.js';
import { ChainBrokenError, CorruptImageError, UnsupportedVersionError } from '../errors.js';
import type { DiskImage, FileOpener } from '../disk-image.js';
import type { ByteRange, RandomAccessFile } from '../types.js';
import { normalizeRanges, subtractRanges } from '../fs/ranges.js';
import {
  COMPRESSION_ZSTD,
  HI_COMPRESSED,
  HI_COPIED,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  LO_ZERO,
  assertReadable,
  decodeCompressed,
  entryOffset,
  looksLikeQcow2,
  parseHeader,
  type Qcow2Header,
} from './codec.js';

/** Backing chains deeper than this are refused: a file that backs itself would loop forever. */
export const MAX_CHAIN_DEPTH = 64;
/** Clean L2 tables kept in memory (bytes); 32 MiB maps 256 GiB with 64 KiB clusters. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

export interface L2Table {
  /** Host offset of the table (cluster-aligned). */
  host: number;
  buf: Buffer;
  /** Changed in memory and not yet written (writer only). */
  dirty: boolean;
}

/** What one guest cluster is, decoded from its L2 entry. */
export type ClusterState =
  | { kind: 'unallocated' }
  | { kind: 'zero'; host: number }
  | { kind: 'data'; host: number; copied: boolean }
  | { kind: 'compressed'; offset: number; length: number };

export interface OpenedHeader {
  header: Qcow2Header;
  fileSize: number;
}

/** Reads cluster 0 (bounded by the file size) and parses the header from it. */
export async function readHeader(file: RandomAccessFile): Promise<OpenedHeader> {
  const fileSize = await file.size();
  const first = Buffer.alloc(Math.min(fileSize, 512));
  await file.read(first, 0);
  if (first.length < 24 || !looksLikeQcow2(first)) return { header: parseHeader(first, fileSize), fileSize };
  const clusterBits = first.readUInt32BE(20);
  // cluster_bits is checked by parseHeader; clamp here so a bad value cannot size a buffer.
  const clusterSize = 2 ** Math.min(Math.max(clusterBits, 9), 21);
  const head = Buffer.alloc(Math.min(fileSize, clusterSize));
  await file.read(head, 0);
  return { header: parseHeader(head, fileSize), fileSize };
}

/** A raw backing file as a DiskImage: bytes map one to one. */
class RawBacking implements DiskImage {
  readonly format = 'raw' as const;
  readonly subformat = 'raw';
  constructor(private readonly file: RandomAccessFile, readonly size: number) {}
  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size) throw new RangeError(`read of ${into.length} bytes at ${at} passes the raw backing size ${this.size}`);
    await this.file.read(into, at);
  }
  async allocated(): Promise<ByteRange[]> {
    return this.size > 0 ? [{ offset: 0, length: this.size }] : [];
  }
  async close(): Promise<void> {
    await this.file.close();
  }
}

/** Opens the backing disk named in the header, through the opener (names are relative to the image). */
export async function openBacking(h: Qcow2Header, name: string, opener: FileOpener, depth: number): Promise<DiskImage | null> {
  if (h.backingFile === null) return null;
  if (depth >= MAX_CHAIN_DEPTH) {
    throw new ChainBrokenError(`${name}: backing chain deeper than ${MAX_CHAIN_DEPTH} images (does ${h.backingFile} back itself?); fix it with qemu-img rebase`, { depth });
  }
  let file: RandomAccessFile;
  try {
    file = await opener(h.backingFile, 'r');
  } catch (e) {
    throw new ChainBrokenError(`${name}: its backing file ${h.backingFile} cannot be opened (${(e as Error).message}); put it beside the image or point to it with qemu-img rebase -u -b`, { backingFile: h.backingFile });
  }
  try {
    let format = h.backingFormat;
    if (format === null) {
      // No backing-format extension (old images): qemu probes; so do we, qcow2 or raw only.
      const size = await file.size();
      const head = Buffer.alloc(Math.min(size, 8));
      await file.read(head, 0);
      format = looksLikeQcow2(head) ? 'qcow2' : 'raw';
    }
    if (format === 'qcow2') return await Qcow2Image.open(file, opener, depth + 1, h.backingFile);
    if (format === 'raw') return new RawBacking(file, await file.size());
    throw new UnsupportedVersionError(`${name}: backing file ${h.backingFile} is in format "${format}"; imagekeep follows only qcow2 and raw backing files (convert the chain with qemu-img convert)`, { format });
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
}

/**
 * The mapping layer shared by reader and writer: header, L1 table, L2 cache, backing disk.
 * Offsets of the file are checked against `fileEnd` (the file size, or the writer's
 * allocation end) before anything is read from them.
 */
export class Qcow2Layer {
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** L2 entries per table: cluster_size / 8. */
  readonly l2Entries: number;
  readonly size: number;
  private readonly l2Cache = new Map<number, L2Table>();
  private readonly l2Loading = new Map<number, Promise<L2Table>>();
  private cachedBytes = 0;
  private lastInflated: { offset: number; data: Buffer } | null = null;
  private zstd: InstanceType<typeof zstdBinding.DCtx> | null = null;

  constructor(
    readonly file: RandomAccessFile,
    readonly header: Qcow2Header,
    /** The active L1 table, l1_size entries of 8 bytes. */
    readonly l1: Buffer,
    public fileEnd: number,
    readonly backing: DiskImage | null,
    readonly name: string,
  ) {
    this.clusterSize = header.clusterSize;
    this.clusterBits = header.clusterBits;
    this.l2Entries = header.clusterSize / 8;
    this.size = header.size;
  }

  static async load(file: RandomAccessFile, header: Qcow2Header, fileSize: number, backing: DiskImage | null, name: string): Promise<Qcow2Layer> {
    const l1 = Buffer.alloc(header.l1Size * 8); // bounded by parseHeader: inside the file, at most 32 MiB
    if (l1.length > 0) await file.read(l1, header.l1TableOffset);
    return new Qcow2Layer(file, header, l1, fileSize, backing, name);
  }

  /** Host offset of L2 table `l1Index`, 0 when none; checks alignment and bounds. */
  l2Offset(l1Index: number): number {
    const hi = this.l1.readUInt32BE(l1Index * 8);
    const lo = this.l1.readUInt32BE(l1Index * 8 + 4);
    const host = entryOffset(hi, lo);
    if (host === 0) return 0;
    if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0 || host % this.clusterSize !== 0 || host >= this.fileEnd) {
      throw new CorruptImageError(`${this.name}: L1 entry ${l1Index} (0x${hi.toString(16).padStart(8, '0')}${lo.toString(16).padStart(8, '0')}) does not point at a cluster inside the file (${this.fileEnd} bytes); the image is damaged, try qemu-img check`, { l1Index, host });
    }
    return host;
  }

  /** The L2 table for `l1Index`, or null when the L1 entry is empty. */
  async l2(l1Index: number): Promise<L2Table | null> {
    const cached = this.l2Cache.get(l1Index);
    if (cached) {
      // Map order is the LRU order: move to the back.
      this.l2Cache.delete(l1Index);
      this.l2Cache.set(l1Index, cached);
      return cached;
    }
    const host = this.l2Offset(l1Index);
    if (host === 0) return null;
    let loading = this.l2Loading.get(l1Index);
    if (!loading) {
      loading = (async () => {
        const buf = Buffer.alloc(this.clusterSize);
        // Tolerate a table cut short by the end of the file: the missing entries read as unallocated.
        const n = Math.min(this.clusterSize, this.fileEnd - host);
        await this.file.read(buf.subarray(0, n), host);
        return { host, buf, dirty: false };
      })();
      this.l2Loading.set(l1Index, loading);
    }
    try {
      const table = await loading;
      if (!this.l2Cache.has(l1Index)) this.remember(l1Index, table);
      return this.l2Cache.get(l1Index) ?? table;
    } finally {
      this.l2Loading.delete(l1Index);
    }
  }

  /**
   * Adds a table to the cache (the writer adds new, dirty tables here too) and evicts the
   * least recently used clean ones over budget; dirty tables wait for the writer's flush.
   */
  remember(l1Index: number, table: L2Table): void {
    this.l2Cache.set(l1Index, table);
    this.cachedBytes += table.buf.length;
    if (this.cachedBytes <= L2_CACHE_BYTES) return;
    for (const [k, t] of this.l2Cache) {
      if (this.cachedBytes <= L2_CACHE_BYTES) break;
      if (t.dirty || k === l1Index) continue;
      this.l2Cache.delete(k);
      this.cachedBytes -= t.buf.length;
    }
  }

  /** Tables changed in memory, for the writer's flush. */
  dirtyTables(): [number, L2Table][] {
    return [...this.l2Cache].filter(([, t]) => t.dirty);
  }

  /** Decodes entry `index` of an L2 table (null table: unallocated). */
  state(table: L2Table | null, index: number, guest: number): ClusterState {
    if (!table) return { kind: 'unallocated' };
    const hi = table.buf.readUInt32BE(index * 8);
    const lo = table.buf.readUInt32BE(index * 8 + 4);
    return this.decode(hi, lo, guest);
  }

  decode(hi: number, lo: number, guest: number): ClusterState {
    if (hi & HI_COMPRESSED) {
      const c = decodeCompressed(hi, lo, this.clusterBits);
      if (c.offset >= this.fileEnd || c.offset < this.clusterSize) {
        throw new CorruptImageError(`${this.name}: compressed cluster for guest offset ${guest} starts at ${c.offset}, outside the file (${this.fileEnd} bytes); the image is damaged`, { guest, host: c.offset });
      }
      return { kind: 'compressed', offset: c.offset, length: c.length };
    }
    const host = entryOffset(hi, lo);
    if (host !== 0 && (host % this.clusterSize !== 0 || host >= this.fileEnd)) {
      throw new CorruptImageError(`${this.name}: L2 entry for guest offset ${guest} points at host offset ${host}, not a cluster inside the file (${this.fileEnd} bytes, clusters of ${this.clusterSize}); the image is damaged`, { guest, host });
    }
    // The zero flag exists from version 3 on; in version 2 bit 0 is reserved and ignored.
    if ((lo & LO_ZERO) !== 0 && this.header.version >= 3) return { kind: 'zero', host };
    if (host === 0) return { kind: 'unallocated' };
    return { kind: 'data', host, copied: (hi & HI_COPIED) !== 0 };
  }

  /** The state of guest cluster `g`. */
  async clusterState(g: number): Promise<ClusterState> {
    const l1Index = Math.floor(g / this.l2Entries);
    const table = await this.l2(l1Index);
    return this.state(table, g % this.l2Entries, g * this.clusterSize);
  }

  /**
   * Fills `into` from guest offset `at`. Runs of clusters that are contiguous in the file
   * become one read; runs read from the backing disk likewise. The reads go out together.
   */
  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size || !Number.isInteger(at)) {
      throw new RangeError(`${this.name}: read of ${into.length} bytes at ${at} passes the virtual size ${this.size}`);
    }
    const cs = this.clusterSize;
    // Reads go out as soon as a run ends and are awaited together; each is marked handled at
    // once so that one failing while the loop still works is not an unhandled rejection.
    const pending: Promise<void>[] = [];
    const issue = (p: Promise<void>) => {
      p.catch(() => undefined);
      pending.push(p);
    };
    let run: { host: number; dst: number; length: number } | null = null; // file run
    let back: { guest: number; dst: number; length: number } | null = null; // backing run
    const endRun = () => {
      if (run) issue(this.readHost(into.subarray(run.dst, run.dst + run.length), run.host));
      run = null;
    };
    const endBack = () => {
      if (back) issue(this.readBacking(into.subarray(back.dst, back.dst + back.length), back.guest));
      back = null;
    };
    let pos = at;
    const end = at + into.length;
    let tableIndex = -1;
    let table: L2Table | null = null;
    try {
      while (pos < end) {
        const g = Math.floor(pos / cs);
        const within = pos - g * cs;
        const n = Math.min(cs - within, end - pos);
        const dst = pos - at;
        const l1Index = Math.floor(g / this.l2Entries);
        if (l1Index !== tableIndex) {
          table = await this.l2(l1Index);
          tableIndex = l1Index;
        }
        const st = this.state(table, g % this.l2Entries, g * cs);
        if (st.kind === 'data') {
          endBack();
          const host = st.host + within;
          if (run && run.host + run.length === host) run.length += n;
          else {
            endRun();
            run = { host, dst, length: n };
          }
        } else if (st.kind === 'unallocated' && this.backing) {
          endRun();
          if (back) back.length += n;
          else back = { guest: pos, dst, length: n };
        } else {
          endRun();
          endBack();
          if (st.kind === 'compressed') {
            const data = await this.inflate(st.offset, st.length, g * cs);
            into.set(data.subarray(within, within + n), dst);
          } else {
            into.fill(0, dst, dst + n);
          }
        }
        pos += n;
      }
      endRun();
      endBack();
    } finally {
      await Promise.all(pending);
    }
  }

  /** Reads file bytes; a data cluster cut short by the end of the file reads as zeros past it. */
  private async readHost(into: Uint8Array, host: number): Promise<void> {
    const n = Math.max(0, Math.min(into.length, this.fileEnd - host));
    if (n > 0) await this.file.read(into.subarray(0, n), host);
    if (n < into.length) into.fill(0, n);
  }

  /** Reads from the backing disk; past its end (a smaller backing disk) reads zeros. */
  private async readBacking(into: Uint8Array, guest: number): Promise<void> {
    const backing = this.backing;
    const n = backing ? Math.max(0, Math.min(into.length, backing.size - guest)) : 0;
    if (backing && n > 0) await backing.read(into.subarray(0, n), guest);
    if (n < into.length) into.fill(0, n);
  }

  /** The whole content of guest cluster `g` as the layer reads it now (for copy-on-write). */
  async readCluster(g: number): Promise<Buffer> {
    const cs = this.clusterSize;
    const buf = Buffer.alloc(cs);
    const start = g * cs;
    const n = Math.min(cs, this.size - start);
    await this.read(buf.subarray(0, n), start);
    return buf;
  }

  /** Inflates the compressed cluster at `offset`; the descriptor's length is an upper bound. */
  async inflate(offset: number, length: number, guest: number): Promise<Buffer> {
    if (this.lastInflated && this.lastInflated.offset === offset) return this.lastInflated.data;
    const n = Math.min(length, this.fileEnd - offset);
    const src = Buffer.alloc(n);
    await this.file.read(src, offset);
    let out: Buffer;
    try {
      out = this.header.compressionType === COMPRESSION_ZSTD ? this.unzstd(src) : this.unzlib(src);
    } catch (e) {
      throw new CorruptImageError(`${this.name}: compressed cluster for guest offset ${guest} (${n} bytes at ${offset}) does not decompress: ${(e as Error).message}`, { guest, offset });
    }
    if (out.length < this.clusterSize) {
      throw new CorruptImageError(`${this.name}: compressed cluster for guest offset ${guest} (at ${offset}) inflates to ${out.length} bytes, not the cluster size ${this.clusterSize}`, { guest, offset });
    }
    const data = out.subarray(0, this.clusterSize);
    this.lastInflated = { offset, data };
    return data;
  }

  /** qemu writes raw deflate (no zlib header); the bytes after the stream's end belong to the next cluster. */
  private unzlib(src: Buffer): Buffer {
    return inflateRawSync(src, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize + 1 });
  }

  /** One zstd frame; streaming decompression stops when the cluster is full, whatever follows. */
  private unzstd(src: Buffer): Buffer {
    if (!this.zstd) this.zstd = new zstdBinding.DCtx();
    const dctx = this.zstd;
    dctx.reset(zstdBinding.ResetDirective.sessionOnly);
    const out = Buffer.alloc(this.clusterSize);
    let produced = 0;
    let consumed = 0;
    while (produced < out.length && consumed < src.length) {
      const [, p, c] = dctx.decompressStream(out.subarray(produced), src.subarray(consumed));
      if (p === 0 && c === 0) break;
      produced += p;
      consumed += c;
    }
    return out.subarray(0, produced);
  }

  /**
   * The guest ranges that may hold data: this layer's data and compressed clusters, plus the
   * backing disk's ranges where this layer has nothing (clusters with the zero flag hide them).
   */
  async allocated(): Promise<ByteRange[]> {
    const cs = this.clusterSize;
    const own: ByteRange[] = [];
    const decided: ByteRange[] = []; // clusters this layer answers for (data, compressed, zero)
    const push = (list: ByteRange[], offset: number, length: number) => {
      const last = list[list.length - 1];
      if (last && last.offset + last.length === offset) last.length += length;
      else list.push({ offset, length });
    };
    const l1Count = Math.min(this.header.l1Size, Math.ceil(this.size / (cs * this.l2Entries)));
    for (let i = 0; i < l1Count; i++) {
      const table = await this.l2(i);
      if (!table) continue;
      for (let j = 0; j < this.l2Entries; j++) {
        const g = i * this.l2Entries + j;
        const start = g * cs;
        if (start >= this.size) break;
        const hi = table.buf.readUInt32BE(j * 8);
        const lo = table.buf.readUInt32BE(j * 8 + 4);
        if (hi === 0 && lo === 0) continue;
        const st = this.decode(hi, lo, start);
        const len = Math.min(cs, this.size - start);
        if (st.kind === 'data' || st.kind === 'compressed') {
          push(own, start, len);
          push(decided, start, len);
        } else if (st.kind === 'zero') {
          push(decided, start, len);
        }
      }
    }
    if (!this.backing) return own;
    const below = (await this.backing.allocated())
      .map((r) => ({ offset: r.offset, length: Math.min(r.offset + r.length, this.size) - r.offset }))
      .filter((r) => r.length > 0);
    return normalizeRanges([...own, ...subtractRanges(below, decided)]);
  }

  async close(): Promise<void> {
    await this.file.close();
    if (this.backing) await this.backing.close();
  }
}

/** A qcow2 disk opened for reading. */
export class Qcow2Image implements DiskImage {
  readonly format = 'qcow2' as const;
  private constructor(private readonly layer: Qcow2Layer) {}

  get size(): number {
    return this.layer.size;
  }

  get subformat(): string {
    return `v${this.layer.header.version}`;
  }

  get header(): Qcow2Header {
    return this.layer.header;
  }

  /** Opens `file`; a backing file is opened through `opener` (depth counts the chain). */
  static async open(file: RandomAccessFile, opener: FileOpener, depth = 0, name = file.path): Promise<Qcow2Image> {
    const { header, fileSize } = await readHeader(file);
    assertReadable(header, name);
    const backing = await openBacking(header, name, opener, depth);
    try {
      return new Qcow2Image(await Qcow2Layer.load(file, header, fileSize, backing, name));
    } catch (e) {
      if (backing) await backing.close().catch(() => undefined);
      throw e;
    }
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.layer.read(into, at);
  }

  allocated(): Promise<ByteRange[]> {
    return this.layer.allocated();
  }

  close(): Promise<void> {
    return this.layer.close();
  }
}
