/**
 * One block's record: compressed when that saves at least 1/16 of the block (random data
 * is stored raw, so reading it costs no decompression), then sealed when the chain is
 * encrypted. Pure functions; the worker threads and the reader share them.
 */
import { Compressor } from 'zstd-napi';
import zstd from 'zstd-napi/binding.js';
import { CorruptImageError } from '../../formats/errors.js';
import { blockDigestMatches, openBlock, sealBlock, type ChainKeys } from './crypto.js';
import { STORED_RAW, STORED_ZSTD, type Compression } from './layout.js';

export interface EncodeOptions {
  compression: Compression;
  level: number;
  keys: ChainKeys | null;
}

export class BlockEncoder {
  private readonly compressor: Compressor | null;
  constructor(private readonly opts: EncodeOptions) {
    this.compressor = opts.compression === 'zstd' ? new Compressor() : null;
    this.compressor?.setParameters({ compressionLevel: opts.level });
  }

  /** Returns the record bytes and the stored method (flags bits 8..15). */
  encode(block: number, data: Uint8Array): { record: Uint8Array; method: number } {
    let payload: Uint8Array = data;
    let method = STORED_RAW;
    if (this.compressor) {
      const z = this.compressor.compress(data);
      if (z.length <= data.length - (data.length >> 4)) {
        payload = z;
        method = STORED_ZSTD;
      }
    }
    const record = this.opts.keys ? sealBlock(this.opts.keys, block, payload) : payload;
    return { record, method };
  }
}

export class BlockDecoder {
  // Created on first use: most layers of a long chain are opened but never read.
  private dctx: zstd.DCtx | null = null;
  constructor(private readonly keys: ChainKeys | null) {}

  /**
   * Turns a record back into the block's bytes and checks them against the digest.
   * Throws CorruptImageError naming the file and block when anything does not match.
   * A raw record of an unencrypted chain comes back as a view of `record`, not a copy.
   */
  decode(record: Uint8Array, method: number, block: number, length: number, digest: Uint8Array, where: string): Buffer {
    if (method === STORED_RAW && !this.keys) {
      const data = Buffer.from(record.buffer, record.byteOffset, record.byteLength);
      this.check(data, block, length, digest, where);
      return data;
    }
    const data = Buffer.allocUnsafe(length);
    this.decodeInto(record, method, block, data, digest, where);
    return data;
  }

  /**
   * `decode` into `into`, whose length is the block's: zstd inflates straight into it (the
   * run buffer of an export), so a block costs no allocation and no copy of its own.
   */
  decodeInto(record: Uint8Array, method: number, block: number, into: Uint8Array, digest: Uint8Array, where: string): void {
    let payload: Uint8Array | null = record;
    if (this.keys) {
      payload = openBlock(this.keys, block, record);
      if (!payload) throw new CorruptImageError(`${where}: block ${block} fails its authentication tag; the image is damaged`, { block });
    }
    if (method === STORED_ZSTD) {
      let n: number;
      try {
        this.dctx ??= new zstd.DCtx();
        // A frame that inflates to more than the block fails here ("destination buffer is too small").
        n = this.dctx.decompress(into, payload);
      } catch {
        throw new CorruptImageError(`${where}: block ${block} does not decompress to its ${into.length} bytes; the image is damaged`, { block });
      }
      if (n !== into.length) {
        throw new CorruptImageError(`${where}: block ${block} holds ${n} bytes, expected ${into.length}; the image is damaged`, { block });
      }
    } else if (method === STORED_RAW) {
      if (payload.length !== into.length) {
        throw new CorruptImageError(`${where}: block ${block} holds ${payload.length} bytes, expected ${into.length}; the image is damaged`, { block });
      }
      into.set(payload);
    } else {
      throw new CorruptImageError(`${where}: block ${block} has unknown storage method ${method}`, { block });
    }
    this.check(into, block, into.length, digest, where);
  }

  /** Checks a block's bytes, already in place, against its length and digest. */
  check(data: Uint8Array, block: number, length: number, digest: Uint8Array, where: string): void {
    if (data.length !== length) {
      throw new CorruptImageError(`${where}: block ${block} holds ${data.length} bytes, expected ${length}; the image is damaged`, { block });
    }
    if (!blockDigestMatches(data, this.keys?.digestKey ?? null, digest)) {
      throw new CorruptImageError(`${where}: block ${block} fails its checksum; the image is damaged`, { block });
    }
  }
}
