/**
 * A raw disk image (or block device) as a BlockDevice: bytes map one to one.
 */
import { LocalFile } from './local-file.js';
import type { BlockDevice, RandomAccessFile } from './types.js';

export class RawDevice implements BlockDevice {
  private constructor(readonly file: RandomAccessFile, readonly size: number) {}

  static async open(file: RandomAccessFile): Promise<RawDevice> {
    return new RawDevice(file, await file.size());
  }

  static async openPath(path: string): Promise<RawDevice> {
    return RawDevice.open(await LocalFile.open(path, 'r'));
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the device size ${this.size}`);
    }
    await this.file.read(into, at);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
