/**
 * A bandwidth limit on writes to a file: each write books its share of the wire at the
 * given rate and waits until its slot comes. Reads are not limited (the read-back is the
 * job's own check and runs after the writes).
 */
import type { RandomAccessFile } from '../formats/types.js';

export class ThrottledFile implements RandomAccessFile {
  private nextFree = 0;

  constructor(private readonly inner: RandomAccessFile, private readonly bytesPerSecond: number) {}

  get path(): string {
    return this.inner.path;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.inner.read(into, at);
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    const now = Date.now();
    const start = Math.max(now, this.nextFree);
    this.nextFree = start + (from.length / this.bytesPerSecond) * 1000;
    if (start > now) await new Promise((r) => setTimeout(r, start - now));
    await this.inner.write(from, at);
  }

  truncate(size: number): Promise<void> {
    return this.inner.truncate(size);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
