/**
 * A RandomAccessFile held in memory: for fuzzing header parsers (thousands of mutated
 * images per second, no disk) and for tests that need a file without a filesystem.
 */
import type { RandomAccessFile } from './types.js';

export class MemoryFile implements RandomAccessFile {
  private bytes: Buffer;
  private length: number;

  constructor(readonly path: string, initial: Uint8Array = new Uint8Array(0)) {
    this.bytes = Buffer.from(initial);
    this.length = initial.length;
  }

  /** The file's current contents (a view, not a copy). */
  contents(): Buffer {
    return this.bytes.subarray(0, this.length);
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.length) {
      throw new RangeError(`${this.path}: read of ${into.length} bytes at ${at} passes the end of the file (${this.length} bytes)`);
    }
    into.set(this.bytes.subarray(at, at + into.length));
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    this.ensure(at + from.length);
    this.bytes.set(from, at);
    this.length = Math.max(this.length, at + from.length);
  }

  async truncate(size: number): Promise<void> {
    this.ensure(size);
    if (size < this.length) this.bytes.fill(0, size, this.length);
    this.length = size;
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}

  private ensure(end: number): void {
    if (end <= this.bytes.length) return;
    const grown = Buffer.alloc(Math.max(end, this.bytes.length * 2));
    grown.set(this.bytes.subarray(0, this.length));
    this.bytes = grown;
  }
}
