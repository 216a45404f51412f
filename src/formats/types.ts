/**
 * The interfaces every layer of imagekeep speaks: a random-access file (local or, later,
 * SFTP), and a block device (a disk image, a point in time of a chain, a partition).
 * Offsets and sizes are bytes unless a name says otherwise; they stay below 2^53.
 */

export interface RandomAccessFile {
  readonly path: string;
  size(): Promise<number>;
  /** Fills `into` completely from `at`; a read past the end throws, it is never short. */
  read(into: Uint8Array, at: number): Promise<void>;
  write(from: Uint8Array, at: number): Promise<void>;
  truncate(size: number): Promise<void>;
  /** Makes written data durable (fsync). */
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** A run of bytes of a device and what it holds at this layer. */
export interface Extent {
  offset: number;
  length: number;
  /** data: stored bytes; zero: reads as zeros; absent: not this layer's, ask the layer below. */
  kind: 'data' | 'zero' | 'absent';
}

export interface BlockDevice {
  readonly size: number;
  /** Fills `into` completely from `at`; `at + into.length` must not pass `size`. */
  read(into: Uint8Array, at: number): Promise<void>;
  close(): Promise<void>;
}

/** A byte range [offset, offset + length). */
export interface ByteRange {
  offset: number;
  length: number;
}
