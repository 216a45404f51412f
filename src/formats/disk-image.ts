/**
 * What every virtual-disk codec (raw, vhd, vhdx, vmdk, qcow2) offers the rest of imagekeep.
 *
 * A codec reads a disk as a BlockDevice and, where the format allows, writes one through a
 * DiskWriter. Codecs see only RandomAccessFiles, never paths, so the same code writes a local
 * file or a file on a hypervisor host over SFTP. Formats that span several files (a VMDK
 * descriptor and its `-flat.vmdk`) reach their siblings through a FileOpener.
 */
import type { BlockDevice, ByteRange, RandomAccessFile } from './types.js';

export type DiskFormat = 'raw' | 'vhd' | 'vhdx' | 'vmdk' | 'qcow2';

/**
 * Sub-formats by format:
 *   vhd:   fixed | dynamic | differencing (read only)
 *   vhdx:  dynamic | fixed
 *   vmdk:  monolithicSparse | streamOptimized | monolithicFlat | vmfs
 *   qcow2: v3 (v2 read)
 *   raw:   raw
 */
export type DiskSubformat = string;

/** Opens a file named relative to the disk's own file (a VMDK extent, a parent disk). */
export type FileOpener = (name: string, mode: 'r' | 'r+' | 'w' | 'wx') => Promise<RandomAccessFile>;

/** A virtual disk opened for reading. `read` takes any byte range inside `size`. */
export interface DiskImage extends BlockDevice {
  readonly format: DiskFormat;
  readonly subformat: DiskSubformat;
  /**
   * The ranges that may hold data, in ascending order, merged where adjacent. Everything
   * else reads as zeros. A codec may report a range as allocated that holds zeros, never
   * the reverse. Used to copy a disk without reading its holes.
   */
  allocated(): Promise<ByteRange[]>;
}

/**
 * A virtual disk opened for writing: a new one being created, or an existing dynamic disk
 * grown in place. Writes take offsets and lengths that are multiples of 512.
 *
 * Crash safety: a write to a place the disk has not allocated yet goes to new space in the
 * file at once, but the metadata that points at it (BAT entry, grain table entry, L2 entry,
 * refcount) is kept in memory until `flush`, which syncs the data, then writes the metadata,
 * then syncs again. A killed writer therefore leaves metadata pointing only at data that
 * arrived; every block reads either its old or its new content. Writes into space that is
 * already allocated go in place.
 */
export interface DiskWriter {
  readonly format: DiskFormat;
  readonly subformat: DiskSubformat;
  readonly size: number;
  write(from: Uint8Array, at: number): Promise<void>;
  /** Reads back through the writer's view (pending metadata included). */
  read(into: Uint8Array, at: number): Promise<void>;
  /** Data first, sync, metadata, sync: afterwards everything written is durable and reachable. */
  flush(): Promise<void>;
  /** Flushes and closes the file(s). */
  close(): Promise<void>;
  /** Closes the file(s) without flushing (after a failure). */
  abort(): Promise<void>;
}

export interface CreateOptions {
  /** Virtual size in bytes, a multiple of 512. */
  size: number;
  subformat?: DiskSubformat;
  /** The file name the disk will finally have (VMDK descriptors name their extents). */
  finalName: string;
  /** Format block size in bytes where the format has one (VHD/VHDX block, VMDK grain, qcow2 cluster). */
  blockSize?: number;
  /** VHD fixed only: Azure's upload rules (size a whole number of MiB, checked). */
  azure?: boolean;
  /** Seconds since the epoch, for timestamps inside the format; default now. */
  time?: number;
}

/** Our own structure check of a disk: what independent tools do not look at. */
export interface StructureReport {
  /** One sentence per problem found; empty when the disk is sound. */
  problems: string[];
  /** Sizes and offsets of the format's structures (virtual size, block size, table offsets, allocated blocks). */
  layout: Record<string, number | string | boolean>;
}

/**
 * One format's codec, as the registry (src/formats/registry.ts) sees it. Built explicitly,
 * never registered as a side effect of an import.
 */
export interface FormatDriver {
  readonly format: DiskFormat;
  /** How sure the driver is that these are its bytes, 0..100, from the file's first 64 KiB and last 512 bytes. */
  probe(head: Uint8Array, tail: Uint8Array): number;
  open(file: RandomAccessFile, opener: FileOpener): Promise<DiskImage>;
  /** Creates a new disk in `file` (empty, opened for writing). Absent for formats we only read. */
  create?(file: RandomAccessFile, opener: FileOpener, options: CreateOptions): Promise<DiskWriter>;
  /** Opens an existing disk to grow it in place, first repairing what the format allows (VHD's trailing footer). */
  openWritable?(file: RandomAccessFile, opener: FileOpener): Promise<DiskWriter>;
  check(file: RandomAccessFile, opener: FileOpener): Promise<StructureReport>;
}
