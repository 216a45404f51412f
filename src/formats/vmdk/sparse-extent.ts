/**
 * One hosted sparse extent ("KDMV" file) opened for reading: monolithicSparse (versions
 * 1–3, zeroed-grain entries), and streamOptimized both as VMware lays it out (GD_AT_END,
 * footer) and as qemu does (GD up front). Grain tables are read on demand and cached; the
 * sparse writer shares this class, pinning the tables whose entries it changed until they
 * are written.
 *
 * Every table offset and size is checked against the file's size before anything is
 * allocated, so a lying header fails with one sentence instead of an allocation.
 */
import { inflate } from 'node:zlib';
import { promisify } from 'node:util';
import { SECTOR } from '../bytes.js';
import { CorruptImageError } from '../errors.js';
import type { ByteRange, RandomAccessFile } from '../types.js';
import {
  FLAG_REDUNDANT_GD,
  FLAG_ZEROED_GRAIN_GTE,
  GRAIN_MARKER_SIZE,
  GTE_ZEROED,
  HEADER_SIZE,
  MARKER_EOS,
  MARKER_FOOTER,
  assertHeaderUsable,
  gdEntryCount,
  hasKdmvMagic,
  hasMarkers,
  isCompressed,
  isZero,
  parseMarker,
  parseSparseHeader,
  parseTable,
  tableSectors,
  tableView,
  type SparseHeader,
} from './codec.js';

const inflateAsync = promisify(inflate) as (buf: Uint8Array, options: { maxOutputLength: number }) => Promise<Buffer>;

/** Grain tables kept in memory by a reader: 4096 × 2 KiB = 8 MiB, enough for 128 GiB of disk. */
const GT_CACHE_LIMIT = 4096;
/** Batches of adjacent grain tables read at once when scanning the whole disk. */
const SCAN_BATCH_BYTES = 8 * 1024 * 1024;
/** Reads and inflates in flight during one read() call. */
const READ_PARALLEL = 16;

export class SparseExtent {
  readonly grainBytes: number;
  /** Bytes of disk this extent provides (capacity × 512). */
  readonly sizeBytes: number;
  readonly compressed: boolean;
  readonly markers: boolean;
  readonly zeroedGrains: boolean;
  readonly gtBytes: number;
  private readonly cache = new Map<number, Uint32Array>();
  private readonly pinned = new Set<number>();

  private constructor(
    readonly file: RandomAccessFile,
    readonly name: string,
    /** The header as found at sector 0. */
    readonly fileHeader: SparseHeader,
    /** The header in force: the footer when the file header says GD_AT_END. */
    readonly header: SparseHeader,
    readonly gd: Uint32Array,
    readonly rgd: Uint32Array | null,
    /** Grows as a writer appends grains. */
    public fileSize: number,
    /** The embedded descriptor's text up to its first NUL, or null when there is none. */
    readonly descriptorText: string | null,
    /** For a disk just created: 1 for each GT still known to be all zeros in the file, so it is not read. */
    private readonly knownEmpty: Uint8Array | null,
  ) {
    this.grainBytes = header.grainSize * SECTOR;
    this.sizeBytes = header.capacity * SECTOR;
    this.compressed = isCompressed(header);
    this.markers = hasMarkers(header);
    this.zeroedGrains = (header.flags & FLAG_ZEROED_GRAIN_GTE) !== 0;
    this.gtBytes = header.numGTEsPerGT * 4;
  }

  static async open(file: RandomAccessFile, name: string, opts: { tablesKnownEmpty?: boolean } = {}): Promise<SparseExtent> {
    const fileSize = await file.size();
    if (fileSize < HEADER_SIZE) {
      throw new CorruptImageError(`${name}: the file is ${fileSize} bytes, less than the 512-byte VMDK header; it is truncated`);
    }
    const head = new Uint8Array(HEADER_SIZE);
    await file.read(head, 0);
    const fileHeader = parseSparseHeader(head, name);
    let header = fileHeader;
    if (fileHeader.gdAtEnd) {
      // the header still locates the descriptor, so it must be sound too
      assertHeaderUsable(fileHeader, fileSize, name);
      header = await readFooter(file, name, fileSize);
    }
    assertHeaderUsable(header, fileSize, name);

    const gdEntries = gdEntryCount(header);
    const gd = await readTable(file, header.gdOffset, gdEntries, fileSize, `${name}: the grain directory`);
    let rgd: Uint32Array | null = null;
    if ((header.flags & FLAG_REDUNDANT_GD) !== 0 && header.rgdOffset !== 0) {
      rgd = await readTable(file, header.rgdOffset, gdEntries, fileSize, `${name}: the redundant grain directory`);
    }
    let descriptorText: string | null = null;
    if (fileHeader.descriptorOffset !== 0 && fileHeader.descriptorSize !== 0) {
      const d = new Uint8Array(fileHeader.descriptorSize * SECTOR);
      await file.read(d, fileHeader.descriptorOffset * SECTOR);
      const end = d.indexOf(0);
      descriptorText = Buffer.from(d.subarray(0, end < 0 ? d.length : end)).toString('utf8');
    }
    const knownEmpty = opts.tablesKnownEmpty ? new Uint8Array(gdEntries).fill(1) : null;
    return new SparseExtent(file, name, fileHeader, header, gd, rgd, fileSize, descriptorText, knownEmpty);
  }

  /** True when a GD or GT entry means "nothing stored here". */
  isEmptyEntry(v: number): boolean {
    return v === 0 || (this.zeroedGrains && v === GTE_ZEROED);
  }

  /** GT `index` (null when its GD entry is empty); cached. */
  async table(index: number): Promise<Uint32Array | null> {
    const hit = this.cache.get(index);
    if (hit) return hit;
    const sector = this.gd[index]!;
    if (this.isEmptyEntry(sector)) return null;
    let t: Uint32Array;
    if (this.knownEmpty?.[index]) {
      t = new Uint32Array(this.header.numGTEsPerGT);
      // from now on the file is the truth for this table (once flushed; until then it is pinned)
      this.knownEmpty[index] = 0;
    } else {
      t = await readTable(this.file, sector, this.header.numGTEsPerGT, this.fileSize, `${this.name}: grain table ${index}`);
    }
    this.remember(index, t);
    return t;
  }

  /** Keeps GT `index` in memory until unpinAll (a writer changed it and has not written it yet). */
  pin(index: number): void {
    this.pinned.add(index);
  }

  unpinAll(): void {
    this.pinned.clear();
  }

  private remember(index: number, t: Uint32Array): void {
    if (this.cache.size >= GT_CACHE_LIMIT) {
      // Map iterates in insertion order: drop the oldest half that nobody pinned
      let drop = this.cache.size / 2;
      for (const k of this.cache.keys()) {
        if (drop <= 0) break;
        if (this.pinned.has(k)) continue;
        this.cache.delete(k);
        drop--;
      }
    }
    this.cache.set(index, t);
  }

  /** The GT entry of a grain (0 when its GT is absent). */
  async entry(grain: number): Promise<number> {
    const n = this.header.numGTEsPerGT;
    const gdIndex = Math.floor(grain / n);
    const t = await this.table(gdIndex);
    return t ? t[grain - gdIndex * n]! : 0;
  }

  /** Reads bytes [at, at + into.length) of this extent's disk. */
  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.sizeBytes) {
      throw new RangeError(`${this.name}: read of ${into.length} bytes at ${at} passes the extent's ${this.sizeBytes} bytes`);
    }
    const gb = this.grainBytes;
    let pending: Promise<void>[] = [];
    let runFile = -1;
    let runDst = 0;
    let runLen = 0;
    const endRun = () => {
      if (runLen > 0) pending.push(this.readFile(into.subarray(runDst, runDst + runLen), runFile));
      runLen = 0;
    };
    let done = 0;
    while (done < into.length) {
      const pos = at + done;
      const grain = Math.floor(pos / gb);
      const inGrain = pos - grain * gb;
      const n = Math.min(gb - inGrain, into.length - done);
      const gte = await this.entry(grain);
      if (this.isEmptyEntry(gte)) {
        endRun();
        into.fill(0, done, done + n);
      } else if (this.compressed) {
        endRun();
        pending.push(this.readCompressed(gte, grain, inGrain, into.subarray(done, done + n)));
      } else {
        const off = gte * SECTOR + inGrain;
        if (runLen > 0 && runFile + runLen === off && runDst + runLen === done) runLen += n;
        else {
          endRun();
          runFile = off;
          runDst = done;
          runLen = n;
        }
      }
      done += n;
      if (pending.length >= READ_PARALLEL) {
        await Promise.all(pending);
        pending = [];
      }
    }
    endRun();
    await Promise.all(pending);
  }

  private async readFile(into: Uint8Array, at: number): Promise<void> {
    if (at + into.length > this.fileSize) {
      throw new CorruptImageError(
        `${this.name}: a grain table entry points at byte ${at}, and ${into.length} bytes from there pass the end of the file (${this.fileSize} bytes); the file is truncated or its tables are damaged`,
      );
    }
    await this.file.read(into, at);
  }

  private async readCompressed(sector: number, grain: number, inGrain: number, into: Uint8Array): Promise<void> {
    const plain = await inflateGrainAt(this.file, this.name, this.fileSize, sector, grain, this.grainBytes, this.markers);
    if (plain.length < inGrain + into.length) {
      throw new CorruptImageError(
        `${this.name}: grain ${grain} at sector ${sector} decompresses to ${plain.length} bytes, fewer than the ${inGrain + into.length} needed; the file is damaged`,
      );
    }
    into.set(plain.subarray(inGrain, inGrain + into.length));
  }

  /**
   * The byte ranges of this extent that hold grains, ascending and merged. Adjacent grain
   * tables are read in 8 MiB batches, so a 2 TiB disk's 128 MiB of tables costs 16 reads.
   */
  async allocatedRanges(): Promise<ByteRange[]> {
    const n = this.header.numGTEsPerGT;
    const runsByTable = new Map<number, [number, number][]>();
    const scanTable = (index: number, t: Uint32Array) => {
      const runs: [number, number][] = [];
      for (let j = 0; j < n; j++) {
        if (this.isEmptyEntry(t[j]!)) continue;
        const g = index * n + j;
        const last = runs[runs.length - 1];
        if (last && last[1] === g) last[1] = g + 1;
        else runs.push([g, g + 1]);
      }
      if (runs.length > 0) runsByTable.set(index, runs);
    };
    // tables in memory are the truth (a writer's may be newer than the file); the rest are read
    const toRead: number[] = [];
    for (let i = 0; i < this.gd.length; i++) {
      if (this.isEmptyEntry(this.gd[i]!) || this.knownEmpty?.[i]) continue;
      const cached = this.cache.get(i);
      if (cached) scanTable(i, cached);
      else toRead.push(i);
    }
    toRead.sort((a, b) => this.gd[a]! - this.gd[b]!);
    const gtSectors = tableSectors(n);
    const perBatch = Math.max(1, Math.floor(SCAN_BATCH_BYTES / (gtSectors * SECTOR)));
    for (let k = 0; k < toRead.length; ) {
      let end = k + 1;
      while (end < toRead.length && end - k < perBatch && this.gd[toRead[end]!]! === this.gd[toRead[end - 1]!]! + gtSectors) end++;
      const first = this.gd[toRead[k]!]!;
      const batchBytes = (end - k) * gtSectors * SECTOR;
      if (first * SECTOR + batchBytes <= this.fileSize) {
        const bytes = new Uint8Array(batchBytes);
        await this.file.read(bytes, first * SECTOR);
        for (let m = k; m < end; m++) {
          const slice = bytes.subarray((m - k) * gtSectors * SECTOR, (m - k) * gtSectors * SECTOR + n * 4);
          if (!isZero(slice)) scanTable(toRead[m]!, tableView(slice, n));
        }
      } else {
        // a batch passing the end of the file goes table by table, so the error names the table
        for (let m = k; m < end; m++) {
          const index = toRead[m]!;
          scanTable(index, await readTable(this.file, this.gd[index]!, n, this.fileSize, `${this.name}: grain table ${index}`));
        }
      }
      k = end;
    }
    const out: ByteRange[] = [];
    const indices = [...runsByTable.keys()].sort((a, b) => a - b);
    for (const index of indices) {
      for (const [g0, g1] of runsByTable.get(index)!) {
        const offset = g0 * this.grainBytes;
        const end = Math.min(g1 * this.grainBytes, this.sizeBytes);
        const last = out[out.length - 1];
        if (last && last.offset + last.length === offset) last.length = end - last.offset;
        else out.push({ offset, length: end - offset });
      }
    }
    return out;
  }
}

/**
 * Decompresses the grain stored at `sector`: with markers, {lba, size} then the zlib data;
 * without, zlib data straight away. At most one grain comes out, whatever the data claims.
 */
export async function inflateGrainAt(
  file: RandomAccessFile,
  name: string,
  fileSize: number,
  sector: number,
  grain: number,
  grainBytes: number,
  markers: boolean,
): Promise<Buffer> {
  const off = sector * SECTOR;
  const avail = fileSize - off;
  // random data deflates to slightly more than it was; twice a grain is qemu's bound too
  const limit = 2 * grainBytes + SECTOR;
  if (avail <= GRAIN_MARKER_SIZE) {
    throw new CorruptImageError(`${name}: grain ${grain} points at sector ${sector}, at or past the end of the file (${fileSize} bytes)`);
  }
  let data: Uint8Array;
  if (markers) {
    const first = new Uint8Array(Math.min(avail, 4096));
    await file.read(first, off);
    const m = parseMarker(first);
    if (m.size === 0 || m.size > limit || GRAIN_MARKER_SIZE + m.size > avail) {
      throw new CorruptImageError(
        `${name}: grain ${grain} at sector ${sector} has a marker claiming ${m.size} compressed bytes (the file has ${avail} bytes from there; a grain compresses to at most ${limit}); the grain tables are damaged`,
      );
    }
    if (GRAIN_MARKER_SIZE + m.size <= first.length) data = first.subarray(GRAIN_MARKER_SIZE, GRAIN_MARKER_SIZE + m.size);
    else {
      data = new Uint8Array(m.size);
      await file.read(data, off + GRAIN_MARKER_SIZE);
    }
  } else {
    data = new Uint8Array(Math.min(avail, limit));
    await file.read(data, off);
  }
  try {
    return await inflateAsync(data, { maxOutputLength: grainBytes });
  } catch (e) {
    throw new CorruptImageError(
      `${name}: grain ${grain} at sector ${sector} does not decompress to at most ${grainBytes} bytes (${e instanceof Error ? e.message : String(e)}); the file is damaged`,
    );
  }
}

/** Reads `entries` u32 at `sector`, refusing tables that pass the end of the file. */
export async function readTable(file: RandomAccessFile, sector: number, entries: number, fileSize: number, what: string): Promise<Uint32Array> {
  const bytes = entries * 4;
  if (sector * SECTOR + bytes > fileSize) {
    throw new CorruptImageError(`${what} (${entries} entries at sector ${sector}) passes the end of the file (${fileSize} bytes); the file is truncated or damaged`);
  }
  const buf = new Uint8Array(bytes);
  await file.read(buf, sector * SECTOR);
  return parseTable(buf, entries);
}

/**
 * The footer of a streamOptimized file whose header says GD_AT_END: footer marker, a copy
 * of the header holding the real GD offset, and the end-of-stream marker, as the last three
 * sectors (where qemu and libvmdk look).
 */
async function readFooter(file: RandomAccessFile, name: string, fileSize: number): Promise<SparseHeader> {
  const missing = `${name}: the header says the grain directory is at the end of the file, but the file does not end with a footer and an end-of-stream marker; the stream was cut short (copy it again)`;
  if (fileSize < 4 * SECTOR) throw new CorruptImageError(missing);
  const tail = new Uint8Array(3 * SECTOR);
  await file.read(tail, fileSize - 3 * SECTOR);
  const fm = parseMarker(tail.subarray(0, SECTOR));
  const eos = parseMarker(tail.subarray(2 * SECTOR));
  const footerBytes = tail.subarray(SECTOR, 2 * SECTOR);
  if (fm.size !== 0 || fm.type !== MARKER_FOOTER || !hasKdmvMagic(footerBytes) || eos.value !== 0 || eos.size !== 0 || eos.type !== MARKER_EOS) {
    throw new CorruptImageError(missing);
  }
  const footer = parseSparseHeader(footerBytes, `${name} (footer)`);
  if (footer.gdAtEnd) throw new CorruptImageError(`${name}: the footer, like the header, says the grain directory is at the end; the file is damaged`);
  return footer;
}
