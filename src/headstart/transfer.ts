/**
 * Moving a point's blocks into a standby disk, and checking them there afterwards.
 *
 * Blocks go in ascending order, adjacent selected blocks joined into runs of up to 4 MiB,
 * decoded on worker threads with several runs in flight while the oldest is written. A seed
 * skips blocks that read as zero (a new sparse disk already reads them so: nothing is sent);
 * an apply writes every changed block, zeros included, because the disk held older content.
 *
 * The read-back opens the disk afresh through its format's reader (not the writer's view),
 * reads the selected blocks and compares each with the chain's digest of that block.
 */
import { isAllZero } from '../formats/bytes.js';
import type { DiskImage, DiskWriter } from '../formats/disk-image.js';
import { ImagekeepError } from '../formats/errors.js';
import { blockDigestMatches } from '../chain/image/crypto.js';
import { DecodePool } from '../chain/image/decode-pool.js';
import { blockLength } from '../chain/image/layout.js';
import type { PointInTime } from '../chain/point.js';

const RUN_BYTES = 4 * 1024 * 1024;
const IN_FLIGHT = 4;

export interface CopyStats {
  /** Blocks written to the disk. */
  blocks: number;
  /** Bytes written to the disk (data only, not the format's metadata). */
  bytes: number;
}

export interface CopyOptions {
  /** First block to consider (a resumed seed). */
  from?: number;
  /** Skip blocks whose content is all zeros (seeding a new, empty disk). */
  skipZeroBlocks: boolean;
  signal?: AbortSignal;
  /** Bytes written so far, after each run. */
  onProgress?: (bytes: number) => void;
  /** Decode on this thread instead of worker threads (in-process tests, tiny disks). */
  inlineDecode?: boolean;
  /** Every `bytes` written: flush the writer, then `save(nextBlock)` (a resumable seed). */
  checkpoint?: { bytes: number; save: (nextBlock: number) => Promise<void> };
}

/** Runs of consecutive selected blocks from `from`, each at most `maxCount` long. */
export function* selectedRuns(blockCount: number, selected: (b: number) => boolean, maxCount: number, from = 0): Generator<{ first: number; count: number }> {
  let b = from;
  while (b < blockCount) {
    if (!selected(b)) {
      b++;
      continue;
    }
    const first = b;
    while (b < blockCount && b - first < maxCount && selected(b)) b++;
    yield { first, count: b - first };
  }
}

/** Writes the selected blocks of `point` into `writer`. */
export async function copyBlocks(point: PointInTime, writer: DiskWriter, selected: (b: number) => boolean, opts: CopyOptions): Promise<CopyStats> {
  const bs = point.blockSize;
  const pool = opts.inlineDecode ? null : new DecodePool(point.top.keys);
  const decode = (first: number, count: number): Promise<Buffer> => {
    if (pool) return pool.readBlocks(point, first, count);
    const into = Buffer.allocUnsafe(Math.min((first + count) * bs, point.size) - first * bs);
    return point.readBlocks(first, count, into).then(() => into);
  };
  const inFlight: { first: number; count: number; data: Promise<Buffer> }[] = [];
  const stats: CopyStats = { blocks: 0, bytes: 0 };
  let sinceCheckpoint = 0;

  const writeOldest = async (): Promise<void> => {
    const run = inFlight.shift()!;
    const data = await run.data;
    if (opts.skipZeroBlocks) {
      // Write the maximal stretches of non-zero blocks; zero blocks stay holes.
      let i = 0;
      while (i < run.count) {
        const nonZero = (k: number): boolean => !isAllZero(data.subarray(k * bs, Math.min((k + 1) * bs, data.length)));
        if (!nonZero(i)) {
          i++;
          continue;
        }
        let j = i + 1;
        while (j < run.count && nonZero(j)) j++;
        const part = data.subarray(i * bs, Math.min(j * bs, data.length));
        await writer.write(part, (run.first + i) * bs);
        stats.blocks += j - i;
        stats.bytes += part.length;
        sinceCheckpoint += part.length;
        i = j;
      }
    } else {
      await writer.write(data, run.first * bs);
      stats.blocks += run.count;
      stats.bytes += data.length;
      sinceCheckpoint += data.length;
    }
    opts.onProgress?.(stats.bytes);
    if (opts.checkpoint && sinceCheckpoint >= opts.checkpoint.bytes) {
      await writer.flush();
      await opts.checkpoint.save(run.first + run.count);
      sinceCheckpoint = 0;
    }
  };

  try {
    for (const run of selectedRuns(point.blockCount, selected, Math.max(1, Math.floor(RUN_BYTES / bs)), opts.from ?? 0)) {
      if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
      const data = decode(run.first, run.count);
      data.catch(() => {}); // observed by writeOldest; avoid an unhandled rejection meanwhile
      inFlight.push({ ...run, data });
      if (inFlight.length >= IN_FLIGHT) await writeOldest();
    }
    while (inFlight.length > 0) await writeOldest();
  } finally {
    await pool?.close();
  }
  return stats;
}

export class StandbyMismatchError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('STANDBY_MISMATCH', message, details);
  }
}

export interface ReadBackStats {
  blocks: number;
  bytes: number;
  seconds: number;
}

/**
 * Reads the selected blocks back from `disk` and compares each with the digest the chain
 * holds for it at `point` (a block that reads as zero at the point must read as zeros).
 */
export async function readBack(point: PointInTime, disk: DiskImage, selected: (b: number) => boolean, diskName: string): Promise<ReadBackStats> {
  const started = Date.now();
  const bs = point.blockSize;
  const digestKey = point.top.keys?.digestKey ?? null;
  const stats: ReadBackStats = { blocks: 0, bytes: 0, seconds: 0 };
  const inFlight: { first: number; count: number; data: Promise<Buffer> }[] = [];

  const checkOldest = async (): Promise<void> => {
    const run = inFlight.shift()!;
    const data = await run.data;
    for (let i = 0; i < run.count; i++) {
      const b = run.first + i;
      const got = data.subarray(i * bs, i * bs + blockLength(b, point.size, bs));
      const loc = point.locate(b);
      const ok = loc ? blockDigestMatches(got, digestKey, loc.image.digestAt(loc.pos)) : isAllZero(got);
      if (!ok) {
        throw new StandbyMismatchError(
          `${diskName}: block ${b} (bytes ${b * bs}..${b * bs + got.length - 1}) does not hold what the chain has for it at point ${point.top.header.last}; ` +
          'the transfer or the host storage corrupted it. The state was not advanced: run again to rewrite it, and check the host\'s storage',
          { block: b });
      }
      stats.blocks++;
      stats.bytes += got.length;
    }
  };

  for (const run of selectedRuns(point.blockCount, selected, Math.max(1, Math.floor(RUN_BYTES / bs)))) {
    const data = Buffer.allocUnsafe(Math.min((run.first + run.count) * bs, point.size) - run.first * bs);
    const read = disk.read(data, run.first * bs).then(() => data);
    read.catch(() => {});
    inFlight.push({ ...run, data: read });
    if (inFlight.length >= IN_FLIGHT) await checkOldest();
  }
  while (inFlight.length > 0) await checkOldest();
  stats.seconds = (Date.now() - started) / 1000;
  return stats;
}

/**
 * The blocks that differ between point `after` and `point`: every block recorded by a file on
 * the point's path that covers anything newer than `after`. A collapsed file that spans
 * `after` contributes all its blocks (a superset, still correct: each holds its newest content).
 */
export function changedSince(point: PointInTime, after: number): Uint8Array {
  const changed = new Uint8Array(point.blockCount);
  for (const layer of point.layers) {
    if (layer.header.last <= after) continue;
    const ix = layer.index;
    for (let i = 0; i < ix.count; i++) changed[ix.blocks[i]!] = 1;
  }
  return changed;
}
