/**
 * An opened image: header, trailer and index read and checked, records read on demand.
 * Opening never touches block data, so a point of a 1,000-image chain opens by reading
 * 1,000 indexes. `open` returns a ready object or throws a typed error.
 */
import { createHash } from 'node:crypto';
import { read } from 'node:fs';
import { basename } from 'node:path';
import { CorruptImageError, WrongPasswordError } from '../../formats/errors.js';
import { LocalFile } from '../../formats/local-file.js';
import type { RandomAccessFile } from '../../formats/types.js';
import { BlockDecoder } from './block-codec.js';
import { openChainKey, type ChainKeys } from './crypto.js';
import {
  DIGEST_SIZE, ENTRY_ZERO, HEADER_SIZE, TRAILER_SIZE, blockCountOf, blockLength, decodeHeader, decodeIndex, decodeTrailer,
  type ImageHeader, type ImageIndex, type Trailer,
} from './layout.js';

/**
 * Unwrapped chain keys, cached by wrapped key so a chain's images cost one scrypt (images
 * opened at the same time wait for the same one).
 */
export class KeyRing {
  private readonly cache = new Map<string, Promise<ChainKeys>>();
  constructor(readonly password: Buffer | null) {}
  async keysFor(header: ImageHeader, where: string): Promise<ChainKeys | null> {
    if (!header.encryption) return null;
    const id = header.encryption.wrappedKey.toString('hex');
    const hit = this.cache.get(id);
    if (hit) return hit;
    if (!this.password) {
      throw new WrongPasswordError(`${where} is encrypted: give the password with --password-file FILE or IMAGEKEEP_PASSWORD_FILE`);
    }
    const keys = openChainKey(this.password, header.chainId, header.encryption, where);
    this.cache.set(id, keys);
    // A failure (a wrong password) is not kept: the next image asks again and says so itself.
    keys.catch(() => this.cache.delete(id));
    return keys;
  }
}

export class ImageFile {
  readonly name: string;
  readonly blockCount: number;
  private readonly decoder: BlockDecoder;

  private constructor(
    readonly path: string,
    private readonly file: RandomAccessFile,
    readonly header: ImageHeader,
    readonly trailer: Trailer,
    readonly index: ImageIndex,
    readonly size: number,
    readonly keys: ChainKeys | null,
  ) {
    this.name = basename(path);
    this.blockCount = blockCountOf(header.virtualSize, header.blockSize);
    this.decoder = new BlockDecoder(keys);
  }

  static async open(path: string, keyring: KeyRing = new KeyRing(null)): Promise<ImageFile> {
    const file = await LocalFile.open(path, 'r');
    try {
      return await ImageFile.openFile(file, keyring);
    } catch (e) {
      await file.close();
      throw e;
    }
  }

  static async openFile(file: RandomAccessFile, keyring: KeyRing): Promise<ImageFile> {
    const where = basename(file.path);
    const size = await file.size();
    const head = Buffer.alloc(Math.min(size, HEADER_SIZE));
    await file.read(head, 0);
    const header = decodeHeader(head, where);
    if (size < HEADER_SIZE + TRAILER_SIZE) throw new CorruptImageError(`${where}: ${size} bytes is too short for an image; it is truncated`);
    const tb = Buffer.alloc(TRAILER_SIZE);
    await file.read(tb, size - TRAILER_SIZE);
    const trailer = decodeTrailer(tb, size, where);
    const ib = Buffer.alloc(trailer.indexLength);
    await file.read(ib, trailer.indexOffset);
    if (!createHash('sha256').update(ib).digest().equals(trailer.indexChecksum)) {
      throw new CorruptImageError(`${where}: index checksum mismatch; the image is damaged`);
    }
    const index = decodeIndex(ib, blockCountOf(header.virtualSize, header.blockSize), where);
    const end = index.count > 0 ? index.offsets[index.count - 1]! + index.storedLengths[index.count - 1]! : HEADER_SIZE;
    if (end !== trailer.indexOffset) {
      throw new CorruptImageError(`${where}: records end at ${end} but the index starts at ${trailer.indexOffset}; the image is damaged`);
    }
    const keys = await keyring.keysFor(header, where);
    return new ImageFile(file.path, file, header, trailer, index, size, keys);
  }

  isZero(pos: number): boolean {
    return (this.index.flags[pos]! & ENTRY_ZERO) !== 0;
  }

  digestAt(pos: number): Uint8Array {
    return this.index.digests.subarray(pos * DIGEST_SIZE, (pos + 1) * DIGEST_SIZE);
  }

  /** The stored record of index entry `pos`, as written (compressed and/or sealed). */
  async readRecord(pos: number): Promise<Buffer> {
    const rec = Buffer.allocUnsafe(this.index.storedLengths[pos]!);
    await this.file.read(rec, this.index.offsets[pos]!);
    return rec;
  }

  /** The records of index entries from..to-1, which lie back to back in the file. */
  async readRecords(from: number, to: number): Promise<Buffer> {
    if (to <= from) return Buffer.alloc(0);
    const buf = Buffer.allocUnsafe(this.recordsLength(from, to));
    await this.readRecordsInto(from, to, buf);
    return buf;
  }

  /** Bytes the records of index entries from..to-1 take (zero entries take none). */
  recordsLength(from: number, to: number): number {
    if (to <= from) return 0;
    return this.index.offsets[to - 1]! + this.index.storedLengths[to - 1]! - this.index.offsets[from]!;
  }

  /**
   * Reads the records of index entries from..to-1 straight into `into` (exactly their
   * length): a collapse places them where they go in its output buffer, with no copy.
   */
  async readRecordsInto(from: number, to: number, into: Uint8Array): Promise<void> {
    const length = this.recordsLength(from, to);
    if (into.length !== length) throw new RangeError(`${this.name}: records ${from}..${to - 1} take ${length} bytes, not ${into.length}`);
    if (length === 0) return;
    const at = this.index.offsets[from]!;
    // A local file is read with plain preads: a collapse issues thousands, and the
    // callback form costs the calling thread less than the promise API.
    if (this.file instanceof LocalFile) await preadFully(this.file.fd, into, at, this.path);
    else await this.file.read(into, at);
  }

  /** The block's bytes, checked against its digest. */
  async readBlock(pos: number): Promise<Buffer> {
    const block = this.index.blocks[pos]!;
    const length = blockLength(block, this.header.virtualSize, this.header.blockSize);
    if (this.isZero(pos)) return Buffer.alloc(length);
    const rec = await this.readRecord(pos);
    return this.decodeRecord(pos, rec);
  }

  decodeRecord(pos: number, rec: Uint8Array): Buffer {
    const block = this.index.blocks[pos]!;
    const length = blockLength(block, this.header.virtualSize, this.header.blockSize);
    return this.decoder.decode(rec, this.index.flags[pos]! >> 8, block, length, this.digestAt(pos), this.name);
  }

  /** `decodeRecord` into `into` (exactly the block's length): no buffer of its own, no copy for zstd. */
  decodeRecordInto(pos: number, rec: Uint8Array, into: Uint8Array): void {
    this.decoder.decodeInto(rec, this.index.flags[pos]! >> 8, this.index.blocks[pos]!, into, this.digestAt(pos), this.name);
  }

  /** Position of `block` in the index, or -1 (binary search). */
  find(block: number): number {
    const b = this.index.blocks;
    let lo = 0;
    let hi = this.index.count - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const v = b[mid]!;
      if (v === block) return mid;
      if (v < block) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** Fills `into` from `at` with preads (which may return less than asked); a read past the end throws. */
function preadFully(fd: number, into: Uint8Array, at: number, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number) => {
      read(fd, into, done, into.length - done, at + done, (err, n) => {
        if (err) reject(err);
        else if (n === 0) reject(new RangeError(`${path}: read of ${into.length} bytes at ${at} passes the end of the file after ${done} bytes`));
        else if (done + n < into.length) step(done + n);
        else resolve();
      });
    };
    step(0);
  });
}
