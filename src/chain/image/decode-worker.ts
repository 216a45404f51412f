/**
 * Worker thread body for DecodePool: turns the records of a run of blocks back into the
 * blocks' bytes (decrypt, decompress, check against the digest) into one output buffer,
 * so that copying a point out uses every core.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { BlockDecoder } from './block-codec.js';
import type { ChainKeys } from './crypto.js';
import { DIGEST_SIZE } from './layout.js';
import type { DecodeJob, DecodeReply } from './decode-pool.js';

const init = workerData as { keys: ChainKeys | null };
const keys = init.keys
  ? { chainId: Buffer.from(init.keys.chainId), blockKey: Buffer.from(init.keys.blockKey), digestKey: Buffer.from(init.keys.digestKey) }
  : null;
const decoder = new BlockDecoder(keys);

parentPort!.on('message', (job: DecodeJob) => {
  try {
    const out = Buffer.alloc(job.outLength);
    const records = Buffer.from(job.records.buffer, job.records.byteOffset, job.records.byteLength);
    const n = job.items.length / 5;
    for (let i = 0; i < n; i++) {
      const [recAt, recLen, method, block, outAt] = [0, 1, 2, 3, 4].map((k) => job.items[i * 5 + k]!) as [number, number, number, number, number];
      const length = job.lengths[i]!;
      const data = decoder.decode(records.subarray(recAt, recAt + recLen), method, block, length, job.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE), job.where[i]!);
      out.set(data, outAt);
    }
    parentPort!.postMessage({ id: job.id, out } satisfies DecodeReply, [out.buffer as ArrayBuffer]);
  } catch (e) {
    const err = e as Error & { code?: string; details?: { block?: number } };
    parentPort!.postMessage({ id: job.id, error: err.message, corrupt: err.code === 'CORRUPT_IMAGE', block: err.details?.block } satisfies DecodeReply);
  }
});
