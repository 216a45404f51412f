/**
 * RandomAccessFile over a local file (or block device) with Node's promise API.
 * Reads loop until the buffer is full, because pread may return fewer bytes than asked.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { RandomAccessFile } from './types.js';

export class LocalFile implements RandomAccessFile {
  private constructor(readonly path: string, private readonly handle: FileHandle) {}

  /** mode: 'r' read-only, 'r+' read-write existing, 'w' create or truncate, 'wx' create new. */
  static async open(path: string, mode: 'r' | 'r+' | 'w' | 'wx' = 'r'): Promise<LocalFile> {
    const flags = mode === 'w' ? 'w+' : mode === 'wx' ? 'wx+' : mode;
    return new LocalFile(path, await open(path, flags));
  }

  get fd(): number {
    return this.handle.fd;
  }

  async size(): Promise<number> {
    const st = await this.handle.stat();
    if (st.isBlockDevice()) return blockDeviceSize(this.handle);
    return st.size;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    let done = 0;
    while (done < into.length) {
      const { bytesRead } = await this.handle.read(into, done, into.length - done, at + done);
      if (bytesRead === 0) {
        throw new RangeError(`${this.path}: read of ${into.length} bytes at ${at} passes the end of the file after ${done} bytes`);
      }
      done += bytesRead;
    }
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    let done = 0;
    while (done < from.length) {
      const { bytesWritten } = await this.handle.write(from, done, from.length - done, at + done);
      done += bytesWritten;
    }
  }

  async truncate(size: number): Promise<void> {
    await this.handle.truncate(size);
  }

  async flush(): Promise<void> {
    await this.handle.sync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** A block device's stat size is 0; its size is where reading stops, found by seeking via a read at the end. */
async function blockDeviceSize(handle: FileHandle): Promise<number> {
  // Binary search on readable offsets: Node has no BLKGETSIZE64 ioctl.
  const probe = Buffer.alloc(1);
  let lo = 0; // readable
  let hi = 2 ** 50; // not readable
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    const { bytesRead } = await handle.read(probe, 0, 1, mid);
    if (bytesRead === 1) lo = mid; else hi = mid;
  }
  return lo + 1;
}
