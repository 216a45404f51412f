/**
 * The unit of work of a backup: a run of consecutive source blocks, classified and encoded
 * off the main thread. Shared by the worker and the in-process fallback.
 */
import { blockDigest } from './crypto.js';
import { BlockEncoder, type EncodeOptions } from './block-codec.js';
import { DIGEST_SIZE } from './layout.js';

/** What the previous point holds for a block. */
export const PREV_ZERO = 0;
export const PREV_DATA = 1;

/** What this image records for a block. */
export const OUT_SKIP = 0; // absent: unchanged (or zero in a base)
export const OUT_ZERO = 1;
export const OUT_DATA = 2;

export interface BatchRequest {
  id: number;
  data: Uint8Array; // the source bytes of blocks firstBlock.. (last may be short)
  firstBlock: number;
  blockSize: number;
  /** 1 where the filesystem says the block is free: read it as zero */
  free: Uint8Array | null;
  /** per block PREV_*; null for a base */
  prevKinds: Uint8Array | null;
  prevDigests: Uint8Array | null;
}

export interface BatchResult {
  id: number;
  firstBlock: number;
  data: Uint8Array; // handed back for reuse
  kinds: Uint8Array;
  digests: Uint8Array;
  lengths: Uint32Array;
  methods: Uint8Array;
  records: Uint8Array; // concatenated records of OUT_DATA blocks, in order
  /** blocks whose bytes were non-zero but recorded as zero because the filesystem marks them free */
  freedBytes: number;
}

const ZERO = new Uint8Array(64 * 1024 * 1024 / 64); // 1 MiB of zeros to compare against

function isZero(b: Uint8Array): boolean {
  for (let at = 0; at < b.length; at += ZERO.length) {
    const n = Math.min(ZERO.length, b.length - at);
    if (Buffer.compare(b.subarray(at, at + n), ZERO.subarray(0, n)) !== 0) return false;
  }
  return true;
}

export function processBatch(req: BatchRequest, opts: EncodeOptions, encoder: BlockEncoder): BatchResult {
  const n = Math.ceil(req.data.length / req.blockSize);
  const kinds = new Uint8Array(n);
  const digests = new Uint8Array(n * DIGEST_SIZE);
  const lengths = new Uint32Array(n);
  const methods = new Uint8Array(n);
  const parts: Uint8Array[] = [];
  let freedBytes = 0;
  const digestKey = opts.keys?.digestKey ?? null;
  for (let i = 0; i < n; i++) {
    const start = i * req.blockSize;
    const data = req.data.subarray(start, Math.min(start + req.blockSize, req.data.length));
    const prevKind = req.prevKinds ? req.prevKinds[i]! : PREV_ZERO;
    let zero = isZero(data);
    if (!zero && req.free && req.free[i]) {
      zero = true;
      freedBytes += data.length;
    }
    if (zero) {
      kinds[i] = req.prevKinds && prevKind === PREV_DATA ? OUT_ZERO : OUT_SKIP;
      continue;
    }
    const digest = blockDigest(data, digestKey);
    if (req.prevKinds && prevKind === PREV_DATA && req.prevDigests &&
        Buffer.compare(digest, req.prevDigests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE)) === 0) {
      kinds[i] = OUT_SKIP;
      continue;
    }
    const { record, method } = encoder.encode(req.firstBlock + i, data);
    kinds[i] = OUT_DATA;
    digests.set(digest, i * DIGEST_SIZE);
    lengths[i] = record.length;
    methods[i] = method;
    parts.push(record);
  }
  // Always a fresh copy: a raw record is a view of `data`, which is recycled for the next read.
  const records = Buffer.concat(parts);
  return { id: req.id, firstBlock: req.firstBlock, data: req.data, kinds, digests, lengths, methods, records, freedBytes };
}
