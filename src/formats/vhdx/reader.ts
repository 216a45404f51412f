/**
 * A dynamic or fixed VHDX opened for reading (DiskImage). A pending log is replayed in memory
 * (replay.ts); the file is never written. Blocks NOT_PRESENT, ZERO, UNMAPPED and UNDEFINED read
 * as zeros; FULLY_PRESENT blocks are read from the file, one read per run of blocks that are
 * adjacent in the file.
 */
import type { DiskImage } from '../disk-image.js';
import type { ByteRange, RandomAccessFile } from '../types.js';
import { BatTable, allocatedRanges, openStructures, readVirtual, type VhdxStructures } from './image.js';

export class VhdxImage implements DiskImage {
  readonly format = 'vhdx' as const;
  readonly subformat: 'dynamic' | 'fixed';
  readonly size: number;
  private readonly bat: BatTable;

  private constructor(
    readonly file: RandomAccessFile,
    readonly structures: VhdxStructures,
  ) {
    const { metadata, geometry, view, regionState } = structures;
    this.subformat = metadata.leaveBlocksAllocated ? 'fixed' : 'dynamic';
    this.size = metadata.virtualSize;
    this.bat = new BatTable(view, regionState.regions.bat.fileOffset, geometry.batBytes);
  }

  static async open(file: RandomAccessFile): Promise<VhdxImage> {
    return new VhdxImage(file, await openStructures(file));
  }

  /** True when the file has a log that was replayed (in memory) to read it. */
  get replayedLog(): boolean {
    return this.structures.log.length > 0;
  }

  get blockSize(): number {
    return this.structures.geometry.blockSize;
  }

  get logicalSectorSize(): number {
    return this.structures.geometry.logicalSectorSize;
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return readVirtual(this.structures.view, this.bat, this.structures.geometry, into, at);
  }

  allocated(): Promise<ByteRange[]> {
    return allocatedRanges(this.structures.view, this.bat, this.structures.geometry);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
