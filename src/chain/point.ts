/**
 * A point in time as a block device: the images of a dependency path layered newest
 * first. Opening checks every link by content (chain id, point ids, ranges, geometry) and
 * builds two dense tables, the layer and index position of each block, so any read finds
 * its record in O(1) (6 bytes per block of address space; untouched pages cost no memory).
 */
import { ChainBrokenError } from '../formats/errors.js';
import type { BlockDevice } from '../formats/types.js';
import { blockCountOf, blockLength } from './image/layout.js';
import { ImageFile, KeyRing } from './image/reader.js';

const ZERO_ID = Buffer.alloc(16);

export interface BlockLocation {
  image: ImageFile;
  pos: number;
}

/** `count` blocks from `block` whose records are entries pos..pos+count-1 of `image`. */
export interface RecordRun extends BlockLocation {
  block: number;
  count: number;
}

export class PointInTime implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly blockCount: number;
  private readonly layerOf: Uint16Array;
  private readonly posOf: Uint32Array;

  private constructor(readonly layers: ImageFile[]) {
    const top = layers[0]!.header;
    this.size = top.virtualSize;
    this.blockSize = top.blockSize;
    this.blockCount = blockCountOf(this.size, this.blockSize);
    this.layerOf = new Uint16Array(this.blockCount);
    this.posOf = new Uint32Array(this.blockCount);
    // Oldest first, so newer layers overwrite: the newest entry of each block wins.
    for (let l = layers.length - 1; l >= 0; l--) {
      const ix = layers[l]!.index;
      for (let i = 0; i < ix.count; i++) {
        const b = ix.blocks[i]!;
        this.layerOf[b] = l + 1;
        this.posOf[b] = i;
      }
    }
  }

  /** `paths` newest first, ending with the base. Closes what it opened on failure. */
  static async open(paths: string[], keyring: KeyRing = new KeyRing(null)): Promise<PointInTime> {
    const layers: ImageFile[] = [];
    try {
      for (const p of paths) layers.push(await ImageFile.open(p, keyring));
      checkLinks(layers);
      return new PointInTime(layers);
    } catch (e) {
      await Promise.all(layers.map((l) => l.close()));
      throw e;
    }
  }

  get top(): ImageFile {
    return this.layers[0]!;
  }

  /** Where block `b` is stored, or null when it reads as zero (never written or recorded as zero). */
  locate(b: number): BlockLocation | null {
    const l = this.layerOf[b]!;
    if (l === 0) return null;
    const image = this.layers[l - 1]!;
    const pos = this.posOf[b]!;
    if (image.isZero(pos)) return null;
    return { image, pos };
  }

  async readBlock(b: number): Promise<Buffer> {
    const loc = this.locate(b);
    if (!loc) return Buffer.alloc(blockLength(b, this.size, this.blockSize));
    return loc.image.readBlock(loc.pos);
  }

  /**
   * The stored blocks among first..first+count-1 as runs whose records lie back to back in
   * one image (fetched with one read): a base stores its blocks in block order, so copying a
   * whole point reads few, long runs. Blocks that read as zero are in no run.
   */
  *recordRuns(first: number, count: number): Generator<RecordRun> {
    const end = first + count;
    let b = first;
    while (b < end) {
      const loc = this.locate(b);
      if (!loc) {
        b++;
        continue;
      }
      let n = 1;
      while (b + n < end) {
        const next = this.locate(b + n);
        if (!next || next.image !== loc.image || next.pos !== loc.pos + n) break;
        n++;
      }
      yield { block: b, image: loc.image, pos: loc.pos, count: n };
      b += n;
    }
  }

  /** Blocks first..first+count-1 into `into` (zeros where nothing is stored), decoded on this thread. */
  async readBlocks(first: number, count: number, into: Uint8Array): Promise<void> {
    const length = Math.min((first + count) * this.blockSize, this.size) - first * this.blockSize;
    if (into.length < length) throw new RangeError(`blocks ${first}..${first + count - 1} take ${length} bytes, more than the ${into.length} given`);
    into.fill(0, 0, length);
    const reads: Promise<void>[] = [];
    for (const run of this.recordRuns(first, count)) {
      reads.push(run.image.readRecords(run.pos, run.pos + run.count).then((recs) => {
        let o = 0;
        for (let i = 0; i < run.count; i++) {
          const pos = run.pos + i;
          const stored = run.image.index.storedLengths[pos]!;
          const block = run.block + i;
          const at = (block - first) * this.blockSize;
          run.image.decodeRecordInto(pos, recs.subarray(o, o + stored), into.subarray(at, at + blockLength(block, this.size, this.blockSize)));
          o += stored;
        }
      }));
    }
    await Promise.all(reads);
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the point's size ${this.size}`);
    }
    let done = 0;
    while (done < into.length) {
      const off = at + done;
      const b = Math.floor(off / this.blockSize);
      const inBlock = off - b * this.blockSize;
      const n = Math.min(into.length - done, blockLength(b, this.size, this.blockSize) - inBlock);
      const loc = this.locate(b);
      if (!loc) into.fill(0, done, done + n);
      else {
        const data = await loc.image.readBlock(loc.pos);
        into.set(data.subarray(inBlock, inBlock + n), done);
      }
      done += n;
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.layers.map((l) => l.close()));
  }
}

function checkLinks(layers: ImageFile[]): void {
  const top = layers[0]!.header;
  for (let k = 0; k < layers.length; k++) {
    const cur = layers[k]!;
    const h = cur.header;
    if (!h.chainId.equals(top.chainId) || h.virtualSize !== top.virtualSize || h.blockSize !== top.blockSize) {
      throw new ChainBrokenError(`${cur.name} belongs to another chain than ${layers[0]!.name} (chain id or geometry differ); the folder mixes chains`);
    }
    const parent = layers[k + 1];
    if (!parent) {
      if (h.first !== 0 || !h.parentPointId.equals(ZERO_ID)) {
        throw new ChainBrokenError(`${cur.name} is not a base but the path ends there; its parent is missing`);
      }
      continue;
    }
    if (!h.parentPointId.equals(parent.header.endPointId) || parent.header.last !== h.first - 1) {
      throw new ChainBrokenError(`${cur.name} does not follow ${parent.name}: its parent point id does not match (a file was replaced or belongs to another history)`);
    }
  }
}
