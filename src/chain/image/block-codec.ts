/**
 * One block's record: compressed when that saves at least 1/16 of the block (random data
 * is stored raw, so reading it costs no decompression), then sealed when the chain is
 * encrypted. Pure functions; the worker threads and the reader share them.
 */
import { Compressor, Decompressor } from 'zstd-napi';
import { CorruptImageError } from '../../formats/errors.js';
import { blockDigest, openBlock, sealBlock, type ChainKeys } from './crypto.js';
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
  private decompressor: Decompressor | null = null;
  constructor(private readonly keys: ChainKeys | null) {}

  /**
   * Turns a record back into the block's bytes and checks them against the digest.
   * Throws CorruptImageError naming the file and block when anything does not match.
   */
  decode(record: Uint8Array, method: number, block: number, length: number, digest: Uint8Array, where: string): Buffer {
    let payload: Uint8Array | null = record;
    if (this.keys) {
      payload = openBlock(this.keys, block, record);
      if (!payload) throw new CorruptImageError(`${where}: block ${block} fails its authentication tag; the image is damaged`, { block });
    }
    let data: Buffer;
    if (method === STORED_ZSTD) {
      try {
        this.decompressor ??= new Decompressor();
        data = this.decompressor.decompress(payload);
      } catch {
        throw new CorruptImageError(`${where}: block ${block} does not decompress; the image is damaged`, { block });
      }
    } else if (method === STORED_RAW) {
      data = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
    } else {
      throw new CorruptImageError(`${where}: block ${block} has unknown storage method ${method}`, { block });
    }
    if (data.length !== length) {
      throw new CorruptImageError(`${where}: block ${block} holds ${data.length} bytes, expected ${length}; the image is damaged`, { block });
    }
    if (!blockDigest(data, this.keys?.digestKey ?? null).equals(digest)) {
      throw new CorruptImageError(`${where}: block ${block} fails its checksum; the image is damaged`, { block });
    }
    return data;
  }
}
