/**
 * Worker thread body: encodes batches (digest, compress, seal) so that a backup uses every
 * core; the main thread only reads, hashes the output file and writes.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { BlockEncoder, type EncodeOptions } from './block-codec.js';
import { processBatch, type BatchRequest } from './block-batch.js';

const opts = workerData as EncodeOptions;
if (opts.keys) {
  // Buffers arrive as plain Uint8Arrays after structured cloning.
  opts.keys = { chainId: Buffer.from(opts.keys.chainId), blockKey: Buffer.from(opts.keys.blockKey), digestKey: Buffer.from(opts.keys.digestKey) };
}
const encoder = new BlockEncoder(opts);
parentPort!.on('message', (req: BatchRequest) => {
  const res = processBatch(req, opts, encoder);
  const transfer: ArrayBuffer[] = [res.data.buffer as ArrayBuffer];
  if (res.records.buffer !== res.data.buffer && res.records.byteLength > 0) {
    // Copy out of Node's shared pool slab when needed: only whole ArrayBuffers can move.
    if (res.records.byteOffset !== 0 || res.records.byteLength !== res.records.buffer.byteLength) res.records = new Uint8Array(res.records);
    transfer.push(res.records.buffer as ArrayBuffer);
  }
  parentPort!.postMessage(res, transfer);
});
