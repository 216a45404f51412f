/**
 * Worker thread of the open benchmark's generator: writes whole images of the synthetic
 * chain with the library's ImageWriter (records from BlockEncoder, digests from
 * blockDigest), so the real reader accepts them. Each image's blocks come sorted.
 */
import { join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { BlockEncoder } from '../chain/image/block-codec.js';
import { blockDigest } from '../chain/image/crypto.js';
import { STORED_ZSTD, type ImageHeader } from '../chain/image/layout.js';
import { ImageWriter } from '../chain/image/writer.js';
import { formatImageName } from '../chain/names.js';
import { patternBlock } from './datagen.js';

export interface GenImage {
  number: number; // 0 = base
  blocks: Uint32Array; // strictly increasing
  parentPointId: Uint8Array; // zeros for the base
  endPointId: Uint8Array;
}

export interface GenJob {
  folder: string;
  volume: string;
  chainId: Uint8Array;
  virtualSize: number;
  blockSize: number;
  /** point time of the base; image k is k hours later */
  baseTime: number;
  images: GenImage[];
}

export interface GenDone {
  images: number;
  records: number;
  recordBytes: number;
  fileBytes: number;
}

export const HOUR = 3600 * 1000;
const WINDOW = 64;

export async function writeImages(job: GenJob): Promise<GenDone> {
  const encoder = new BlockEncoder({ compression: 'zstd', level: 1, keys: null });
  const data = Buffer.alloc(job.blockSize);
  const done: GenDone = { images: 0, records: 0, recordBytes: 0, fileBytes: 0 };
  for (const im of job.images) {
    const pointTime = job.baseTime + im.number * HOUR;
    const header: ImageHeader = {
      version: 1, chainId: Buffer.from(job.chainId), volume: job.volume, baseNumber: 1, first: im.number, last: im.number, levelBits: 0,
      parentPointId: Buffer.from(im.parentPointId), endPointId: Buffer.from(im.endPointId), pointTime, createdTime: pointTime,
      sourceKind: 'disk', forensic: true, virtualSize: job.virtualSize, sectorSize: 512, blockSize: job.blockSize,
      compression: 'zstd', compressionLevel: 1, encryption: null,
    };
    const name = formatImageName({ volume: job.volume, base: 1, last: im.number, levelBits: 0 });
    const writer = await ImageWriter.create(join(job.folder, name), header);
    try {
      // appendRecord books the entry and the offset synchronously and then awaits one
      // positioned write, so calls made in block order may overlap: keeping a window of
      // writes in flight hides the ~0.1 ms each write costs (1M of them in the default run).
      const inflight: Promise<void>[] = [];
      for (const b of im.blocks) {
        patternBlock(im.number, b, data);
        const { record, method } = encoder.encode(b, data);
        if (method !== STORED_ZSTD) throw new Error(`block ${b} of image ${im.number} did not compress`); // a raw record would alias data
        inflight.push(writer.appendRecord(b, record, method << 8, blockDigest(data, null)));
        if (inflight.length >= WINDOW) await Promise.all(inflight.splice(0));
        done.records++;
        done.recordBytes += record.length;
      }
      await Promise.all(inflight);
      const c = await writer.commit({ mtime: new Date(pointTime) });
      done.fileBytes += c.bytes;
      done.images++;
    } catch (e) {
      await writer.abort();
      throw e;
    }
  }
  return done;
}

if (parentPort && workerData) {
  const port = parentPort;
  writeImages(workerData as GenJob).then(
    (d) => port.postMessage(d),
    (e: unknown) => {
      throw e;
    },
  );
}
