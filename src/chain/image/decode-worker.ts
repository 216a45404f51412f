/**
 * Worker thread body for DecodePool: turns the records of a run of blocks back into the
 * blocks' bytes (decrypt, decompress, check against the digest) in the run's own buffer,
 * and checks in place the blocks the main thread read there already, so that copying a
 * point out uses every core and copies no block.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { BlockDecoder } from './block-codec.js';
import type { ChainKeys } from './crypto.js';
import { DIGEST_SIZE } from './layout.js';
import { IN_PLACE, ITEM_FIELDS, type DecodeJob, type DecodeReply } from './decode-pool.js';

const init = workerData as { keys: ChainKeys | null };
const keys = init.keys
  ? { chainId: Buffer.from(init.keys.chainId), blockKey: Buffer.from(init.keys.blockKey), digestKey: Buffer.from(init.keys.digestKey) }
  : null;
const decoder = new BlockDecoder(keys);

parentPort!.on('message', (job: DecodeJob) => {
  try {
    const out = new Uint8Array(job.out, 0, job.outLength);
    const { items, records } = job;
    const n = items.length / ITEM_FIELDS;
    for (let i = 0; i < n; i++) {
      const k = i * ITEM_FIELDS;
      const recAt = items[k]!;
      const block = items[k + 3]!;
      const outAt = items[k + 4]!;
      const length = job.lengths[i]!;
      const slot = out.subarray(outAt, outAt + length);
      const digest = job.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE);
      if (recAt === IN_PLACE) decoder.check(slot, block, length, digest, job.where[i]!);
      else decoder.decodeInto(records.subarray(recAt, recAt + items[k + 1]!), items[k + 2]!, block, slot, digest, job.where[i]!);
    }
    const back = records.buffer as ArrayBuffer;
    parentPort!.postMessage({ id: job.id, out: job.out, records: back } satisfies DecodeReply, back.byteLength > 0 ? [job.out, back] : [job.out]);
  } catch (e) {
    const err = e as Error & { code?: string; details?: { block?: number } };
    parentPort!.postMessage({ id: job.id, error: err.message, corrupt: err.code === 'CORRUPT_IMAGE', block: err.details?.block } satisfies DecodeReply);
  }
});
