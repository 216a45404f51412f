/**
 * Collapsing consecutive images into one (a daily, weekly, monthly or rolling file): the
 * sources' indexes are merged, the newest entry of each block wins, and its record is
 * copied verbatim (no decompression or re-encryption: records are bound to the chain and
 * block, not to the file). The cost follows the data the sources hold, never the disk
 * size. The new file is written under a temporary name, committed, then read back and
 * checked block by block before the caller may treat anything it replaces as removable.
 */
import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { ChainBrokenError, RefusedError } from '../formats/errors.js';
import type { ChainFile } from './folder.js';
import { INDEX_ENTRY_SIZE, type ImageHeader } from './image/layout.js';
import { ImageFile, KeyRing } from './image/reader.js';
import { ImageWriter, type CommittedImage } from './image/writer.js';
import { formatImageName } from './names.js';
import { deepCheck } from './verify.js';

export interface CollapseTarget {
  first: number;
  last: number;
  levelBits: number;
}

export interface CollapseResult extends CommittedImage {
  name: string;
  sources: string[];
  blocks: number;
  seconds: number;
}

/**
 * `sources` newest first: consecutive files whose ranges together are exactly
 * target.first..target.last (the dependency path between those points).
 */
export async function collapse(dir: string, sources: ChainFile[], target: CollapseTarget, opts: { keyring?: KeyRing; now?: number } = {}): Promise<CollapseResult> {
  const started = Date.now();
  const keyring = opts.keyring ?? new KeyRing(null);
  const newest = sources[0]!;
  const oldest = sources[sources.length - 1]!;
  if (newest.last !== target.last || oldest.first !== target.first) {
    throw new ChainBrokenError(`collapse ${target.first}..${target.last}: the sources cover ${oldest.first}..${newest.last}`);
  }
  const images: ImageFile[] = [];
  try {
    for (const s of sources) images.push(await ImageFile.open(s.path, keyring));
    for (let k = 0; k + 1 < images.length; k++) {
      const h = images[k]!.header;
      const parent = images[k + 1]!.header;
      if (!h.parentPointId.equals(parent.endPointId) || h.first !== parent.last + 1) {
        throw new ChainBrokenError(`${images[k]!.name} does not follow ${images[k + 1]!.name}: the sources of a collapse must be consecutive`);
      }
    }
    const merged = mergeIndexes(images);
    await checkRoom(dir, images, merged.count);

    const top = images[0]!.header;
    const header: ImageHeader = {
      ...top,
      first: target.first,
      last: target.last,
      levelBits: target.levelBits,
      parentPointId: images[images.length - 1]!.header.parentPointId,
      createdTime: opts.now ?? Date.now(),
    };
    const name = formatImageName({ volume: top.volume, base: top.baseNumber, last: target.last, levelBits: target.levelBits });
    const writer = await ImageWriter.create(join(dir, name), header);
    let committed: CommittedImage;
    try {
      for (let i = 0; i < merged.count; i++) {
        const image = images[merged.layer[i]!]!;
        const pos = merged.pos[i]!;
        const block = image.index.blocks[pos]!;
        if (image.isZero(pos)) writer.appendZero(block);
        else await writer.appendRecord(block, await image.readRecord(pos), image.index.flags[pos]!, image.digestAt(pos));
      }
      committed = await writer.commit({ mtime: new Date(top.pointTime), sidecarTime: new Date(opts.now ?? Date.now()) });
    } catch (e) {
      await writer.abort();
      throw e;
    }
    // Read back what landed on disk: nothing it replaces may go until this passes.
    const written = await ImageFile.open(committed.path, keyring);
    try {
      await deepCheck(written);
    } finally {
      await written.close();
    }
    return { ...committed, name, sources: sources.map((s) => s.name), blocks: merged.count, seconds: (Date.now() - started) / 1000 };
  } finally {
    await Promise.all(images.map((i) => i.close()));
  }
}

/** For every block any source holds: which source (newest wins) and where in its index. */
function mergeIndexes(images: ImageFile[]): { count: number; layer: Uint16Array; pos: Uint32Array } {
  let total = 0;
  for (const im of images) total += im.index.count;
  // One sortable key per entry: block × 2^16 + layer keeps blocks in order and, within a
  // block, the newest layer (lowest number) first. Exact below 2^53, i.e. 2^37 blocks.
  const keys = new Float64Array(total);
  let n = 0;
  images.forEach((im, layer) => {
    for (let i = 0; i < im.index.count; i++) keys[n++] = im.index.blocks[i]! * 65536 + layer;
  });
  const order = keys.slice().sort();
  // Position lookup: entries of each layer are sorted by block, so a cursor per layer finds them.
  const cursor = new Uint32Array(images.length);
  const layerOut = new Uint16Array(total);
  const posOut = new Uint32Array(total);
  let out = 0;
  let lastBlock = -1;
  for (let i = 0; i < total; i++) {
    const key = order[i]!;
    const layer = key % 65536;
    const block = (key - layer) / 65536;
    const im = images[layer]!;
    let c = cursor[layer]!;
    while (im.index.blocks[c]! < block) c++;
    cursor[layer] = c + 1;
    if (block === lastBlock) continue;
    lastBlock = block;
    layerOut[out] = layer;
    posOut[out] = c;
    out++;
  }
  return { count: out, layer: layerOut, pos: posOut };
}

/** The output is at most the sources' records plus an index entry per merged block. */
async function checkRoom(dir: string, images: ImageFile[], entries: number): Promise<void> {
  let need = 4096 + 64 + 32 + entries * INDEX_ENTRY_SIZE;
  for (const im of images) need += im.trailer.dataBytes;
  const st = await statfs(dir);
  const free = st.bavail * st.bsize;
  if (free < need) {
    throw new RefusedError('NO_ROOM', `not enough free space in ${dir} to collapse: up to ${need} bytes needed, ${free} available; free space or turn consolidation off for this folder`);
  }
}

