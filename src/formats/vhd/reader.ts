/**
 * A VHD opened for reading, as a DiskImage.
 *
 * Fixed: the bytes before the footer are the disk. Dynamic: the BAT maps each block to its
 * place in the file; a block's data follows its sector bitmap, which a dynamic disk's
 * readers ignore (as qemu does: our writer and qemu's mark every sector of an allocated
 * block), so a read is one file read per block touched. Differencing: the bitmap decides,
 * sector by sector (MSB-first), whether a sector is the child's or comes from the parent;
 * an unallocated block is wholly the parent's. The parent is found through the locators
 * (relative path first) and must carry the unique id the child names.
 */
import { posix } from 'node:path';
import type { DiskImage, FileOpener } from '../disk-image.js';
import { ChainBrokenError, ImagekeepError } from '../errors.js';
import type { BlockDevice, ByteRange, RandomAccessFile } from '../types.js';
import { SECTOR } from '../bytes.js';
import { bitmapHas, UNALLOCATED, uuidText } from './codec.js';
import { loadVhd, type ParentPath, type VhdStructure, type VhdSubformat } from './structure.js';

/** Deeper than any real chain; stops a loop of disks that name each other. */
export const MAX_CHAIN_DEPTH = 64;

/** How a dynamic or differencing disk's blocks lie in its file. */
export interface BlockMap {
  readonly size: number;
  readonly blockSize: number;
  readonly bitmapSize: number;
  /** File offset of block `i`'s sector bitmap, or null when the block is not in this file. */
  blockStart(i: number): number | null;
}

/** The last few sector bitmaps of a differencing disk (one per block, 512 bytes for 2 MiB blocks). */
export class BitmapCache {
  private readonly entries = new Map<number, Uint8Array>();
  constructor(private readonly limit = 64) {}

  async get(file: RandomAccessFile, block: number, at: number, length: number): Promise<Uint8Array> {
    const hit = this.entries.get(block);
    if (hit) {
      this.entries.delete(block);
      this.entries.set(block, hit);
      return hit;
    }
    const bitmap = new Uint8Array(length);
    await file.read(bitmap, at);
    this.entries.set(block, bitmap);
    if (this.entries.size > this.limit) this.entries.delete(this.entries.keys().next().value!);
    return bitmap;
  }
}

export function checkRange(what: string, length: number, at: number, size: number): void {
  if (!Number.isSafeInteger(at) || at < 0 || at + length > size) {
    throw new RangeError(`${what} of ${length} bytes at ${at} passes the disk size ${size}`);
  }
}

/** Reads `into.length` bytes at `at` from a parent, zeros past its end (a smaller parent). */
async function readParent(parent: BlockDevice | null, into: Uint8Array, at: number): Promise<void> {
  if (!parent) {
    into.fill(0);
    return;
  }
  const inside = Math.max(0, Math.min(into.length, parent.size - at));
  if (inside > 0) await parent.read(into.subarray(0, inside), at);
  into.fill(0, inside);
}

/**
 * Reads any byte range of a dynamic disk (`diff` null) or a differencing disk (`diff` with
 * its parent and bitmap cache).
 */
export async function readBlocks(
  file: RandomAccessFile,
  map: BlockMap,
  into: Uint8Array,
  at: number,
  diff: { parent: BlockDevice | null; bitmaps: BitmapCache } | null,
): Promise<void> {
  const bs = map.blockSize;
  let done = 0;
  while (done < into.length) {
    const pos = at + done;
    const block = Math.floor(pos / bs);
    const inBlock = pos - block * bs;
    const n = Math.min(bs - inBlock, into.length - done);
    const seg = into.subarray(done, done + n);
    const start = map.blockStart(block);
    if (start === null) {
      await readParent(diff ? diff.parent : null, seg, pos);
    } else if (!diff) {
      await file.read(seg, start + map.bitmapSize + inBlock);
    } else {
      const bitmap = await diff.bitmaps.get(file, block, start, map.bitmapSize);
      // Runs of sectors that come from the same layer: one read each.
      let p = inBlock;
      const end = inBlock + n;
      while (p < end) {
        const mine = bitmapHas(bitmap, Math.floor(p / SECTOR));
        let q = (Math.floor(p / SECTOR) + 1) * SECTOR;
        while (q < end && bitmapHas(bitmap, q / SECTOR) === mine) q += SECTOR;
        q = Math.min(q, end);
        const part = seg.subarray(p - inBlock, q - inBlock);
        if (mine) await file.read(part, start + map.bitmapSize + p);
        else await readParent(diff.parent, part, block * bs + p);
        p = q;
      }
    }
    done += n;
  }
}

/** The byte ranges of the allocated blocks, merged where adjacent, clipped to the size. */
export function allocatedRanges(map: BlockMap, blockCount: number): ByteRange[] {
  const out: ByteRange[] = [];
  for (let i = 0; i < blockCount; i++) {
    if (map.blockStart(i) === null) continue;
    const offset = i * map.blockSize;
    const length = Math.min(map.blockSize, map.size - offset);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length });
  }
  return out;
}

/** Union of two sorted, merged range lists. */
export function unionRanges(a: ByteRange[], b: ByteRange[]): ByteRange[] {
  const all = [...a, ...b].sort((x, y) => x.offset - y.offset);
  const out: ByteRange[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else out.push({ ...r });
  }
  return out;
}

export class BatMap implements BlockMap {
  constructor(readonly size: number, readonly blockSize: number, readonly bitmapSize: number, private readonly bat: Uint32Array) {}

  blockStart(i: number): number | null {
    const e = this.bat[i]!;
    return e === UNALLOCATED ? null : e * SECTOR;
  }
}

export class VhdImage implements DiskImage {
  readonly format = 'vhd';
  readonly size: number;
  readonly subformat: VhdSubformat;
  private readonly map: BatMap | null;
  private readonly bitmaps = new BitmapCache();

  private constructor(
    private readonly file: RandomAccessFile,
    readonly structure: VhdStructure,
    private readonly parent: DiskImage | null,
  ) {
    this.size = structure.size;
    this.subformat = structure.subformat;
    this.map = structure.bat ? new BatMap(structure.size, structure.blockSize, structure.bitmapSize, structure.bat) : null;
  }

  /** Opens a VHD; a differencing disk's parent (and its parents) through `opener`. */
  static async open(file: RandomAccessFile, opener: FileOpener, depth = 0): Promise<VhdImage> {
    const structure = await loadVhd(file);
    const parent = structure.subformat === 'differencing' ? await openParent(file, structure, opener, depth) : null;
    return new VhdImage(file, structure, parent);
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    checkRange('read', into.length, at, this.size);
    if (into.length === 0) return;
    if (!this.map) return this.file.read(into, at);
    await readBlocks(this.file, this.map, into, at, this.subformat === 'differencing' ? { parent: this.parent, bitmaps: this.bitmaps } : null);
  }

  async allocated(): Promise<ByteRange[]> {
    if (!this.map) return this.size > 0 ? [{ offset: 0, length: this.size }] : [];
    const mine = allocatedRanges(this.map, this.structure.blockCount);
    if (!this.parent) return mine;
    const theirs = (await this.parent.allocated())
      .filter((r) => r.offset < this.size)
      .map((r) => ({ offset: r.offset, length: Math.min(r.length, this.size - r.offset) }));
    return unionRanges(mine, theirs);
  }

  async close(): Promise<void> {
    try {
      await this.parent?.close();
    } finally {
      await this.file.close();
    }
  }
}

/**
 * The names to try for a parent, relative to the child's folder: a Windows relative path
 * as a POSIX one; a Windows absolute path (C:\dir\p.vhd) cannot be followed from here, so
 * its file name, as for the parent-name field; a MacX file URL as its path.
 */
export function parentCandidates(paths: ParentPath[]): string[] {
  const names: string[] = [];
  const add = (n: string) => {
    if (n !== '' && !names.includes(n)) names.push(n);
  };
  for (const { source, path } of paths) {
    let p = path;
    if (source === 'MacX') {
      p = p.replace(/^file:\/\/(localhost)?/i, '');
      try {
        p = decodeURIComponent(p);
      } catch {
        // a malformed escape: use the path as written
      }
    }
    const windowsAbsolute = /^[A-Za-z]:[\\/]/.test(p) || p.startsWith('\\\\');
    const slashed = p.replace(/\\/g, '/');
    const base = posix.basename(slashed);
    if (!windowsAbsolute) add(posix.normalize(slashed).replace(/^\.\//, ''));
    add(base);
  }
  return names;
}

/** An opener for names relative to `dir` (itself relative to the first opener's folder). */
function openerUnder(opener: FileOpener, dir: string): FileOpener {
  if (dir === '.' || dir === '') return opener;
  return (name, mode) => opener(posix.isAbsolute(name) ? name : posix.join(dir, name), mode);
}

export async function openParent(file: RandomAccessFile, s: VhdStructure, opener: FileOpener, depth: number): Promise<DiskImage> {
  if (depth + 1 > MAX_CHAIN_DEPTH) {
    throw new ChainBrokenError(`${file.path} is more than ${MAX_CHAIN_DEPTH} differencing disks deep; the parent locators probably form a loop`);
  }
  const want = s.header!.parentUniqueId;
  const tried: string[] = [];
  const mismatched: string[] = [];
  for (const name of parentCandidates(s.parentPaths)) {
    let pfile: RandomAccessFile;
    try {
      pfile = await opener(name, 'r');
    } catch (e) {
      tried.push(`${name} (${e instanceof Error ? e.message : String(e)})`);
      continue;
    }
    let parent: VhdImage;
    try {
      parent = await VhdImage.open(pfile, openerUnder(opener, posix.dirname(name)), depth + 1);
    } catch (e) {
      await pfile.close().catch(() => {});
      if (e instanceof ImagekeepError) {
        throw new ChainBrokenError(`${file.path}: its parent ${name} cannot be read: ${e.message}`, { parent: name, cause: e.code });
      }
      throw e;
    }
    const id = parent.structure.footer.uniqueId;
    if (Buffer.from(id).equals(Buffer.from(want))) return parent;
    mismatched.push(`${name} has id ${uuidText(id)}`);
    await parent.close().catch(() => {});
  }
  if (mismatched.length > 0) {
    throw new ChainBrokenError(
      `${file.path} needs the parent with unique id ${uuidText(want)}, but ${mismatched.join('; ')}: the parent was replaced or modified; put the original parent back`,
    );
  }
  throw new ChainBrokenError(
    `${file.path} is a differencing disk whose parent cannot be found: tried ${tried.length > 0 ? tried.join(', ') : 'nothing (no locator names a path)'}; put the parent beside it`,
    { parentName: s.header!.parentName },
  );
}
