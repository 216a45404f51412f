/**
 * A volume is a byte range of a device holding one filesystem. Readers address it with
 * volume-relative offsets; every read is checked against the volume and the device first,
 * so a lying pointer becomes a CorruptFilesystemError with the numbers, not a RangeError
 * from deep in the device or a read of the neighbouring partition.
 */
import type { BlockDevice, ByteRange } from '../types.js';
import { CorruptFilesystemError } from './errors.js';

export interface Volume {
  dev: BlockDevice;
  /** Where the volume starts on the device and how long it is (bytes). */
  range: ByteRange;
  signal?: AbortSignal;
}

/** The volume bytes [at, at + length), or a CorruptFilesystemError naming `what` lay outside it. */
export async function readVolume(vol: Volume, at: number, length: number, what: string): Promise<Uint8Array> {
  vol.signal?.throwIfAborted();
  const end = Math.min(vol.range.length, vol.dev.size - vol.range.offset);
  if (!Number.isSafeInteger(at) || !Number.isSafeInteger(length) || at < 0 || length < 0 || at + length > end) {
    throw new CorruptFilesystemError(
      `${what}: bytes ${at}..${at + length} lie outside the volume of ${end} bytes at device offset ${vol.range.offset}`,
      { at, length, volumeLength: end, volumeOffset: vol.range.offset },
    );
  }
  const buf = new Uint8Array(length);
  await vol.dev.read(buf, vol.range.offset + at);
  return buf;
}

export interface AllocationOptions {
  signal?: AbortSignal;
  /**
   * Free runs shorter than this many bytes are left out (counted as in use). A backup block
   * can only be free inside one run, so passing the backup block size loses nothing but a
   * partial last block, and bounds memory on badly fragmented volumes. Default: keep all.
   */
  minRunBytes?: number;
}

/** Allocation units a run needs to be kept under `minRunBytes`. */
export function minUnits(options: AllocationOptions, unitSize: number): number {
  return Math.max(1, Math.ceil((options.minRunBytes ?? 0) / unitSize));
}

/** What one filesystem's allocation bitmap says is free. */
export interface FsAllocation {
  fs: 'ext' | 'ntfs';
  /** Bytes per allocation unit: the ext block size or the NTFS cluster size. */
  unitSize: number;
  /** Allocation units in the filesystem (blocks or clusters). */
  unitCount: number;
  /** Device byte ranges the bitmap marks free, sorted and merged, inside the volume. */
  free: ByteRange[];
  freeBytes: number;
  /** Space that may be free but was counted as in use, and why. */
  notes: string[];
}
