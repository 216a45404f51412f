/**
 * Collapsing consecutive images into one (a daily, weekly, monthly or rolling file): the
 * sources' indexes are merged, the newest entry of each block wins, and its record is
 * copied verbatim (no decompression or re-encryption: records are bound to the chain and
 * block, not to the file). The cost follows the data the sources hold, never the disk
 * size. Records are read straight into the output buffers (adjacent ones in one read, many
 * in flight) while the previous buffers are written. The new file is written under a
 * temporary name and read back and checked record by record before it gets its final name,
 * so nothing it replaces becomes removable before it is sound.
 *
 * A large collapse keeps the calling thread for I/O and uses two worker threads alongside
 * the copy: one takes the MD5 of the output from the buffers as they are written (shared
 * memory, no copy), the other follows the writer, reading every written record back and
 * checking it against its digest. A small one hashes and reads back on the calling thread.
 */
import { stat, statfs } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ChainBrokenError, RefusedError } from '../formats/errors.js';
import type { ChainFile } from './folder.js';
import { DIGEST_SIZE, ENTRY_ZERO, INDEX_ENTRY_SIZE, emptyIndex, type ImageHeader, type ImageIndex } from './image/layout.js';
import { ImageFile, KeyRing } from './image/reader.js';
import { ImageWriter, Md5Worker, type CommittedImage } from './image/writer.js';
import { formatImageName } from './names.js';
import { ReadBackCheck, deepCheck } from './verify.js';

/** Records are copied in buffers of about this size (one write each). */
const CHUNK_BYTES = 4 * 1024 * 1024;
/** While copying, the output is fsynced every this many bytes (the commit's fsync then has little left). */
const SYNC_EVERY = 32 * 1024 * 1024;
/** Buffers written (and hashed) at once: enough that the MD5 worker always has the next one. */
const WRITES_IN_FLIGHT = 3;
/** From this much source data on, the read-back runs in worker threads alongside the copy. */
const WORKERS_FROM_BYTES = 32 * 1024 * 1024;

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
export async function collapse(
  dir: string, sources: ChainFile[], target: CollapseTarget,
  opts: { keyring?: KeyRing; now?: number; /** read back in worker threads; default: from 32 MiB of sources */ workers?: boolean } = {},
): Promise<CollapseResult> {
  const started = Date.now();
  const keyring = opts.keyring ?? new KeyRing(null);
  const newest = sources[0]!;
  const oldest = sources[sources.length - 1]!;
  if (newest.last !== target.last || oldest.first !== target.first) {
    throw new ChainBrokenError(`collapse ${target.first}..${target.last}: the sources cover ${oldest.first}..${newest.last}`);
  }
  // The workers start first, so that they are up by the time the first records are written;
  // whether to use them is judged by the sources' size (their records bound the output's).
  let sourceBytes = 0;
  if (opts.workers === undefined) for (const st of await Promise.all(sources.map((s) => stat(s.path)))) sourceBytes += st.size;
  const useWorkers = opts.workers ?? sourceBytes >= WORKERS_FROM_BYTES;
  let md5: Md5Worker | null = null;
  let check: ReadBackCheck | null = null;
  const images: ImageFile[] = [];
  try {
    if (useWorkers) {
      md5 = new Md5Worker();
      check = new ReadBackCheck();
    }
    // Opened a few at a time (each is a handful of small reads): in source order, every one closed on a failure.
    const opened = await mapLimit(sources, 16, (s) => ImageFile.open(s.path, keyring));
    for (const r of opened) if (r.status === 'fulfilled') images.push(r.value);
    for (const r of opened) if (r.status === 'rejected') throw r.reason;
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
    const out = outputIndex(images, merged);
    const writer = await ImageWriter.create(join(dir, name), header, md5 ? { hasher: md5 } : {});
    md5 = null; // the writer closes it from here on
    let committed: CommittedImage;
    try {
      check?.begin(writer.tempPath, name, out, images[0]!.keys, header);
      await copyRecords(images, merged, out, writer, check, useWorkers);
      committed = await writer.commit({
        mtime: new Date(top.pointTime),
        sidecarTime: new Date(opts.now ?? Date.now()),
        // Read back what landed in the file: it gets its final name only when this passes.
        check: async ({ path, bytes }) => {
          try {
            if (check) {
              await check.finish(bytes, keyring);
            } else {
              const written = await ImageFile.open(path, keyring);
              try {
                await deepCheck(written);
              } finally {
                await written.close();
              }
            }
          } catch (e) {
            // Named as the file it would have become, not by its temporary name.
            if (e instanceof Error) e.message = e.message.replaceAll(basename(path), name);
            throw e;
          }
        },
      });
    } catch (e) {
      await writer.abort();
      throw e;
    }
    return { ...committed, name, sources: sources.map((s) => s.name), blocks: merged.count, seconds: (Date.now() - started) / 1000 };
  } finally {
    await Promise.all([...images.map((i) => i.close()), check?.close(), md5?.close()]);
  }
}

/** fn over every item, at most `limit` at once; the outcomes in item order. */
async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<PromiseSettledResult<R>[]> {
  const out: PromiseSettledResult<R>[] = new Array(items.length);
  let next = 0;
  const lane = async () => {
    while (next < items.length) {
      const i = next++;
      try {
        out[i] = { status: 'fulfilled', value: await fn(items[i]!) };
      } catch (reason) {
        out[i] = { status: 'rejected', reason };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  return out;
}

interface Merged {
  count: number;
  /** per output entry: the source it comes from (0 = newest) and its position in that source's index */
  layer: Uint16Array;
  pos: Uint32Array;
}

/** For every block any source holds: which source (newest wins) and where in its index. */
function mergeIndexes(images: ImageFile[]): Merged {
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

/** The output's index: every merged entry as its source has it (offsets left to the writer). */
function outputIndex(images: ImageFile[], merged: Merged): ImageIndex {
  const index = emptyIndex(merged.count);
  for (let i = 0; i < merged.count; i++) {
    const ix = images[merged.layer[i]!]!.index;
    const pos = merged.pos[i]!;
    index.blocks[i] = ix.blocks[pos]!;
    index.flags[i] = ix.flags[pos]!;
    if (ix.flags[pos]! & ENTRY_ZERO) continue;
    index.storedLengths[i] = ix.storedLengths[pos]!;
    index.digests.set(ix.digests.subarray(pos * DIGEST_SIZE, (pos + 1) * DIGEST_SIZE), i * DIGEST_SIZE);
  }
  index.count = merged.count;
  return index;
}

/**
 * Copies the merged records into the writer in buffers of about CHUNK_BYTES, as a pipeline:
 * while one buffer is written (and hashed, when the writer hashes), the next one's records
 * are read straight into place (records adjacent in their source and in the output with one
 * read, all of a buffer's reads in flight at once). Every SYNC_EVERY bytes the file is
 * fsynced in the background, so that the commit's fsync has only the last part to wait for.
 * The read-back check hears of each write, in file order, once it settled.
 */
async function copyRecords(images: ImageFile[], merged: Merged, out: ImageIndex, writer: ImageWriter, check: ReadBackCheck | null, shared: boolean): Promise<void> {
  interface Pending { done: Promise<void>; buf: Buffer }
  const spare: Buffer[] = [];
  const writes: (Pending & { end: number })[] = [];
  let syncing: Promise<void> | null = null;
  let sinceSync = 0;
  const settleOldest = async () => {
    const w = writes.shift()!;
    await w.done;
    check?.written(w.end);
    spare.push(w.buf);
  };
  /** Starts reading the records of the buffer that begins at entry `from`. */
  const startReads = (from: number): (Pending & { from: number; to: number; data: Buffer }) | null => {
    if (from >= merged.count) return null;
    // The entries of this buffer: at least one, up to CHUNK_BYTES of records.
    let to = from;
    let bytes = 0;
    while (to < merged.count && (bytes === 0 || bytes + out.storedLengths[to]! <= CHUNK_BYTES)) bytes += out.storedLengths[to++]!;
    let buf = spare.pop();
    if (!buf || buf.length < bytes) {
      // Shared memory when the MD5 worker hashes the buffers in place.
      const size = Math.max(CHUNK_BYTES, bytes);
      buf = shared ? Buffer.from(new SharedArrayBuffer(size)) : Buffer.allocUnsafeSlow(size);
    }
    const data = buf.subarray(0, bytes);
    const reads: Promise<void>[] = [];
    let at = 0;
    for (let i = from; i < to;) {
      if (out.storedLengths[i] === 0) {
        i++;
        continue;
      }
      // A run: the following data entries of the same source whose records follow on in it.
      const layer = merged.layer[i]!;
      const image = images[layer]!;
      const first = merged.pos[i]!;
      let last = first;
      let len = out.storedLengths[i]!;
      let j = i + 1;
      for (; j < to; j++) {
        if (out.storedLengths[j] === 0) continue;
        if (merged.layer[j] !== layer || image.index.offsets[merged.pos[j]!] !== image.index.offsets[last]! + image.index.storedLengths[last]!) break;
        last = merged.pos[j]!;
        len += out.storedLengths[j]!;
      }
      reads.push(image.readRecordsInto(first, last + 1, data.subarray(at, at + len)));
      at += len;
      i = j;
    }
    const done = Promise.all(reads).then(() => {});
    done.catch(() => {}); // awaited below; this only keeps a failure from counting as unhandled meanwhile
    return { done, buf, from, to, data };
  };
  let cur = startReads(0);
  let next: typeof cur = null;
  try {
    while (cur) {
      await cur.done;
      if (check?.failure) throw check.failure;
      next = startReads(cur.to);
      if (writes.length >= WRITES_IN_FLIGHT) await settleOldest();
      if (sinceSync >= SYNC_EVERY) {
        await syncing;
        syncing = writer.syncWritten();
        syncing.catch(() => {});
        sinceSync = 0;
      }
      // Issues the write, then (when the writer hashes) hashes the buffer while it is written.
      const done = writer.appendRecords(out, cur.from, cur.to, cur.data);
      done.catch(() => {});
      writes.push({ done, buf: cur.buf, end: writer.position });
      sinceSync += cur.data.length;
      cur = next;
      next = null;
    }
    while (writes.length > 0) await settleOldest();
    await syncing;
  } finally {
    // On a failure, nothing may still be running when the caller closes the sources and removes the file.
    await Promise.allSettled([cur?.done, next?.done, syncing, ...writes.map((w) => w.done)]);
  }
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

