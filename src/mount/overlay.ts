/**
 * The copy-on-write overlay of a `--writable` mount: a block device over the (read-only)
 * point whose writes land in a temporary file and whose reads take each block from that
 * file when it was written, from the point otherwise. Design:
 *
 * - The overlay file maps the device 1:1 (device byte N is file byte N), so it is sparse:
 *   it holds only what was written, whatever the disk size.
 * - A block map (one bit per 4 KiB overlay block, kept as 128 MiB chunks of bitmap that
 *   exist only where something was written) says which blocks the file holds. A block is
 *   marked only after its bytes are in the file, so a concurrent read sees the old or the
 *   new block, never a hole.
 * - Writes are whole overlay blocks: a write covering part of a block first takes the rest
 *   of that block from wherever it lives now (the file, or the point below). Writes run
 *   one at a time (a FIFO), so two partial writes of one block cannot lose each other's
 *   bytes; reads never wait for them.
 * - Over an encrypted chain the file is encrypted too (AES-256-XTS per block, the block
 *   index as tweak, a random key that lives only in this process), so decrypted backup
 *   data never reaches the temporary disk readable; the key dies with the process, and
 *   with it whatever a crash left behind.
 * - The chain is never written: the point below is only ever read.
 *
 * The file is created here and removed by `close()`; when the process is killed instead,
 * `imagekeep umount` removes it (its path is in the mount record).
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { open, rm, type FileHandle } from 'node:fs/promises';
import type { BlockDevice } from '../formats/types.js';

/** Bytes per overlay block: the kernel's page, so page-sized writes need no read first. */
export const OVERLAY_BLOCK = 4096;
/** Blocks per bitmap chunk (4 KiB of bitmap, 128 MiB of disk). */
const CHUNK_BLOCKS = 32768;

/** Which overlay blocks hold data: a sparse bitmap. */
export class BlockMap {
  private readonly chunks = new Map<number, Uint8Array>();
  /** Blocks marked. */
  count = 0;

  has(block: number): boolean {
    const c = this.chunks.get(Math.floor(block / CHUNK_BLOCKS));
    if (!c) return false;
    const i = block % CHUNK_BLOCKS;
    return (c[i >>> 3] & (1 << (i & 7))) !== 0;
  }

  set(block: number): void {
    const k = Math.floor(block / CHUNK_BLOCKS);
    let c = this.chunks.get(k);
    if (!c) this.chunks.set(k, (c = new Uint8Array(CHUNK_BLOCKS / 8)));
    const i = block % CHUNK_BLOCKS;
    const bit = 1 << (i & 7);
    if ((c[i >>> 3] & bit) === 0) {
      c[i >>> 3] |= bit;
      this.count++;
    }
  }
}

export interface OverlayOptions {
  /** Encrypt the file with a key that lives only in this process (for an encrypted chain). */
  encrypt?: boolean;
}

export class Overlay implements BlockDevice {
  readonly size: number;
  readonly map = new BlockMap();
  /** Writes, one after another. */
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    readonly lower: BlockDevice,
    readonly path: string,
    private readonly file: FileHandle,
    private readonly key: Buffer | null,
  ) {
    this.size = lower.size;
  }

  /** Creates the overlay file at `path` (which must not exist) over `lower`. */
  static async create(lower: BlockDevice, path: string, opts: OverlayOptions = {}): Promise<Overlay> {
    const file = await open(path, 'wx+', 0o600);
    return new Overlay(lower, path, file, opts.encrypt ? randomBytes(64) : null);
  }

  /** Bytes the overlay holds (written blocks times the block size). */
  get bytesHeld(): number {
    return this.map.count * OVERLAY_BLOCK;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (!Number.isSafeInteger(at) || at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the disk size ${this.size}`);
    }
    if (into.length === 0) return;
    if (this.map.count === 0) return this.lower.read(into, at);
    // Runs of blocks from the same source, each read with one call.
    const end = at + into.length;
    const parts: Promise<void>[] = [];
    let runStart = at;
    let runMine = this.map.has(Math.floor(at / OVERLAY_BLOCK));
    for (let b = Math.floor(at / OVERLAY_BLOCK) + 1; b * OVERLAY_BLOCK < end; b++) {
      const mine = this.map.has(b);
      if (mine === runMine) continue;
      parts.push(this.readRun(into, at, runStart, b * OVERLAY_BLOCK, runMine));
      runStart = b * OVERLAY_BLOCK;
      runMine = mine;
    }
    parts.push(this.readRun(into, at, runStart, end, runMine));
    await Promise.all(parts);
  }

  /** Bytes [from, to) of the device into `into` (which starts at device byte `at`). */
  private async readRun(into: Uint8Array, at: number, from: number, to: number, mine: boolean): Promise<void> {
    const dst = into.subarray(from - at, to - at);
    if (!mine) return this.lower.read(dst, from);
    if (!this.key) return this.readFile(dst, from);
    // Encrypted: whole blocks are read and decrypted, then the wanted bytes copied out.
    const first = Math.floor(from / OVERLAY_BLOCK);
    const blockEnd = Math.min(this.size, Math.ceil(to / OVERLAY_BLOCK) * OVERLAY_BLOCK);
    const buf = Buffer.allocUnsafe(blockEnd - first * OVERLAY_BLOCK);
    await this.readFile(buf, first * OVERLAY_BLOCK);
    for (let off = 0; off < buf.length; off += OVERLAY_BLOCK) {
      const block = buf.subarray(off, Math.min(buf.length, off + OVERLAY_BLOCK));
      this.cipher(false, first + off / OVERLAY_BLOCK, block).copy(block);
    }
    dst.set(buf.subarray(from - first * OVERLAY_BLOCK, to - first * OVERLAY_BLOCK));
  }

  private async readFile(into: Uint8Array, at: number): Promise<void> {
    for (let done = 0; done < into.length;) {
      const { bytesRead } = await this.file.read(into, done, into.length - done, at + done);
      // A block is marked only once written, so the file always reaches it.
      if (bytesRead === 0) throw new Error(`overlay ${this.path} ends before byte ${at + done}`);
      done += bytesRead;
    }
  }

  /** Writes `from` at device byte `at`; the caller keeps `at + from.length` within `size`. */
  write(from: Uint8Array, at: number): Promise<void> {
    if (!Number.isSafeInteger(at) || at < 0 || at + from.length > this.size) {
      return Promise.reject(new RangeError(`write of ${from.length} bytes at ${at} passes the disk size ${this.size}`));
    }
    if (this.closed) return Promise.reject(new Error(`overlay ${this.path} is closed`));
    const p = this.queue.then(() => this.writeNow(from, at));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async writeNow(from: Uint8Array, at: number): Promise<void> {
    if (from.length === 0) return;
    const first = Math.floor(at / OVERLAY_BLOCK);
    const last = Math.floor((at + from.length - 1) / OVERLAY_BLOCK);
    const start = first * OVERLAY_BLOCK;
    const end = Math.min(this.size, (last + 1) * OVERLAY_BLOCK);
    // The whole blocks touched: edges filled from the device as it reads now (file or point).
    const buf = Buffer.allocUnsafe(end - start);
    if (at > start) await this.read(buf.subarray(0, OVERLAY_BLOCK), start);
    if (at + from.length < end && (last > first || at === start)) {
      const tail = last * OVERLAY_BLOCK;
      await this.read(buf.subarray(tail - start), tail);
    }
    buf.set(from, at - start);
    if (this.key) {
      for (let off = 0; off < buf.length; off += OVERLAY_BLOCK) {
        const block = buf.subarray(off, Math.min(buf.length, off + OVERLAY_BLOCK));
        this.cipher(true, first + off / OVERLAY_BLOCK, block).copy(block);
      }
    }
    for (let done = 0; done < buf.length;) {
      const { bytesWritten } = await this.file.write(buf, done, buf.length - done, start + done);
      done += bytesWritten;
    }
    for (let b = first; b <= last; b++) this.map.set(b);
  }

  private cipher(encrypt: boolean, block: number, data: Buffer): Buffer {
    const tweak = Buffer.alloc(16);
    tweak.writeUIntLE(block, 0, 6);
    const c = encrypt ? createCipheriv('aes-256-xts', this.key!, tweak) : createDecipheriv('aes-256-xts', this.key!, tweak);
    return Buffer.concat([c.update(data), c.final()]);
  }

  /** Waits for writes under way, then closes and removes the file. The point below stays open. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.queue;
    await this.file.close().catch(() => undefined);
    await rm(this.path, { force: true });
  }
}
