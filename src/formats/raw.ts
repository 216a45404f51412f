/**
 * A raw disk image (or block device): bytes map one to one. As a driver it is the fallback
 * every other format outbids in `probe`. Writing skips all-zero ranges of a new file, which
 * stays sparse; an existing file (grow in place) is written as given.
 */
import { isAllZero } from './bytes.js';
import type { CreateOptions, DiskImage, DiskWriter, FormatDriver, StructureReport } from './disk-image.js';
import { UsageError } from './errors.js';
import { LocalFile } from './local-file.js';
import type { ByteRange, RandomAccessFile } from './types.js';

export class RawDevice implements DiskImage {
  readonly format = 'raw';
  readonly subformat = 'raw';

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

  /** Without SEEK_DATA in Node, a raw file cannot tell its holes: all of it may hold data. */
  async allocated(): Promise<ByteRange[]> {
    return this.size > 0 ? [{ offset: 0, length: this.size }] : [];
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

class RawWriter implements DiskWriter {
  readonly format = 'raw';
  readonly subformat = 'raw';
  /** In a new file nothing at or past this offset has been written, so zeros there are already holes. */
  private writtenEnd: number;

  constructor(private readonly file: RandomAccessFile, readonly size: number, fresh: boolean) {
    this.writtenEnd = fresh ? 0 : size;
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + from.length > this.size) {
      throw new RangeError(`write of ${from.length} bytes at ${at} passes the disk size ${this.size}`);
    }
    if (at >= this.writtenEnd && isAllZero(from)) return;
    await this.file.write(from, at);
    this.writtenEnd = Math.max(this.writtenEnd, at + from.length);
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.file.read(into, at);
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  async close(): Promise<void> {
    await this.file.flush();
    await this.file.close();
  }

  async abort(): Promise<void> {
    await this.file.close();
  }
}

export const rawDriver: FormatDriver = {
  format: 'raw',
  probe: () => 1,
  open: (file) => RawDevice.open(file),
  async create(file: RandomAccessFile, _opener, options: CreateOptions): Promise<DiskWriter> {
    if (options.size % 512 !== 0) throw new UsageError(`a disk size must be a multiple of 512 bytes; ${options.size} is not`);
    await file.truncate(options.size);
    return new RawWriter(file, options.size, true);
  },
  async openWritable(file: RandomAccessFile): Promise<DiskWriter> {
    return new RawWriter(file, await file.size(), false);
  },
  async check(file: RandomAccessFile): Promise<StructureReport> {
    const size = await file.size();
    return { problems: size % 512 === 0 ? [] : [`the size ${size} is not a multiple of 512 bytes`], layout: { virtualSize: size } };
  },
};
