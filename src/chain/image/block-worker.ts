/**
 * Worker thread body. By default it encodes batches (digest, compress, seal) so that a backup
 * uses every core; the main thread only reads, hashes the output file and writes. With a
 * `role: 'records'` in its workerData it reads back a file as it is being written (a
 * collapse's output, driven by ReadBackCheck in src/chain/verify.ts) and decodes every record
 * against its digest.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { CorruptImageError } from '../../formats/errors.js';
import { BlockDecoder, BlockEncoder, type EncodeOptions } from './block-codec.js';
import { processBatch, type BatchRequest } from './block-batch.js';
import type { ChainKeys } from './crypto.js';
import { DIGEST_SIZE, ENTRY_ZERO, HEADER_SIZE, blockLength } from './layout.js';

/** What the main thread says to a read-back worker: the file, how far it is written, its end. */
export type ReadBackMessage = ReadBackOpen | { upTo: number } | { end: number };
export interface ReadBackOpen { open: string; entries?: ReadBackEntries; job?: RecordCheckJob }
/** The records of the file: per entry its block, stored length, flags and digest (index order). */
export interface ReadBackEntries { blocks: Float64Array; storedLengths: Uint32Array; flags: Uint16Array; digests: Uint8Array }
/** What a read-back worker answers, once: the number of entries checked, or the first failure. */
export type ReadBackReply = { done: number } | { error: string; corrupt?: boolean; block?: number };

/** What the record check needs besides the entries. */
export interface RecordCheckJob {
  keys: ChainKeys | null;
  virtualSize: number;
  blockSize: number;
  /** the file's name in messages (its final name, not the temporary one) */
  where: string;
}

/** Records are read back in runs of up to this many bytes. */
const RUN_BYTES = 8 * 1024 * 1024;

const data = workerData as EncodeOptions | { role: 'records' };
if ('role' in data) {
  recordCheckWorker(parentPort!);
} else {
  const opts = data;
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
}

/** Reads `length` bytes at `at` into `buf` (pread may return less than asked). */
function readFully(fd: number, buf: Buffer, length: number, at: number): void {
  for (let done = 0; done < length;) {
    const n = readSync(fd, buf, done, length - done, at + done);
    if (n === 0) throw new Error(`the file ends at ${at + done}, before ${at + length}`);
    done += n;
  }
}

/**
 * Serves one read-back: `open` starts it, each `upTo` is handled as it comes (the writer
 * sends one per settled write), `end` answers. After a failure it answers nothing more.
 */
function serve(port: MessagePort, on: { open(m: ReadBackOpen): void; upTo(n: number): void; end(n: number): number }): void {
  let failed = false;
  port.on('message', (m: ReadBackMessage) => {
    if (failed) return;
    try {
      if ('open' in m) on.open(m);
      else if ('upTo' in m) on.upTo(m.upTo);
      else port.postMessage({ done: on.end(m.end) } satisfies ReadBackReply);
    } catch (e) {
      failed = true;
      const corrupt = e instanceof CorruptImageError;
      port.postMessage({ error: (e as Error).message, corrupt, block: corrupt ? (e.details.block as number | undefined) : undefined } satisfies ReadBackReply);
    }
  });
}

/**
 * Record check of the file as read back: on each `upTo`, the records wholly written are read
 * (runs of up to 8 MiB), decrypted, decompressed and checked against their digests, as a
 * deep verify does; `end` answers the number of entries checked.
 */
function recordCheckWorker(port: MessagePort): void {
  let job: RecordCheckJob = { keys: null, virtualSize: 0, blockSize: 0, where: '' };
  let decoder = new BlockDecoder(null);
  let ix: ReadBackEntries = { blocks: new Float64Array(0), storedLengths: new Uint32Array(0), flags: new Uint16Array(0), digests: new Uint8Array(0) };
  let fd = -1;
  let next = 0;
  let at = HEADER_SIZE;
  let buf = Buffer.allocUnsafe(RUN_BYTES);
  const checkTo = (upTo: number) => {
    const count = ix.blocks.length;
    while (next < count) {
      let j = next;
      let bytes = 0;
      while (j < count && at + bytes + ix.storedLengths[j]! <= upTo && (bytes === 0 || bytes + ix.storedLengths[j]! <= RUN_BYTES)) bytes += ix.storedLengths[j++]!;
      if (j === next) return;
      if (bytes > buf.length) buf = Buffer.allocUnsafe(bytes);
      readFully(fd, buf, bytes, at);
      let off = 0;
      for (let k = next; k < j; k++) {
        const len = ix.storedLengths[k]!;
        const flags = ix.flags[k]!;
        if (!(flags & ENTRY_ZERO)) {
          const block = ix.blocks[k]!;
          decoder.decode(buf.subarray(off, off + len), flags >> 8, block, blockLength(block, job.virtualSize, job.blockSize), ix.digests.subarray(k * DIGEST_SIZE, (k + 1) * DIGEST_SIZE), job.where);
        }
        off += len;
      }
      next = j;
      at += bytes;
    }
  };
  serve(port, {
    open: (m) => {
      fd = openSync(m.open, 'r');
      ix = m.entries!;
      job = m.job!;
      const k = job.keys;
      // Buffers arrive as plain Uint8Arrays after structured cloning.
      decoder = new BlockDecoder(k ? { chainId: Buffer.from(k.chainId), blockKey: Buffer.from(k.blockKey), digestKey: Buffer.from(k.digestKey) } : null);
    },
    upTo: checkTo,
    end: (size) => {
      checkTo(size);
      closeSync(fd);
      if (next !== ix.blocks.length) throw new CorruptImageError(`${job.where}: records ${next}.. lie past the end of the written data`);
      return next;
    },
  });
}
