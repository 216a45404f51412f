/**
 * The VMDK driver: reads monolithicSparse, streamOptimized (VMware's and qemu's layouts),
 * monolithicFlat, vmfs and descriptor-plus-sparse-extent disks; writes monolithicSparse
 * (the default), streamOptimized, monolithicFlat and vmfs; grows monolithicSparse,
 * monolithicFlat and vmfs disks in place.
 */
import { SECTOR } from '../bytes.js';
import type { CreateOptions, DiskImage, DiskWriter, FileOpener, FormatDriver, StructureReport } from '../disk-image.js';
import { UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import { checkVmdk } from './check.js';
import { SUBFORMATS, type VmdkSubformat } from './codec.js';
import { createFlat, openFlatWritable } from './flat-writer.js';
import { VmdkImage, openLayout, sniff } from './image.js';
import { createSparse, openSparseWritable } from './sparse-writer.js';
import { createStream } from './stream-writer.js';

/** qemu's probe answers 100 for a VMDK magic or descriptor; the misspelt descriptor line libvmdk refuses still is one. */
export function probeVmdk(head: Uint8Array, _tail: Uint8Array): number {
  const kind = sniff(head);
  if (kind === 'sparse' || kind === 'cowd') return 100;
  if (kind === 'descriptor') {
    const text = Buffer.from(head.subarray(0, 32)).toString('latin1');
    return text.startsWith('# Disk DescriptorFile') || text.startsWith('# Disk Descriptor File') ? 100 : 80;
  }
  return 0;
}

async function create(file: RandomAccessFile, opener: FileOpener, options: CreateOptions): Promise<DiskWriter> {
  const subformat = (options.subformat ?? 'monolithicSparse') as VmdkSubformat;
  if (!SUBFORMATS.includes(subformat)) {
    throw new UsageError(`"${options.subformat}" is not a VMDK subformat we write; choose one of ${SUBFORMATS.join(', ')}`);
  }
  if (!Number.isSafeInteger(options.size) || options.size <= 0 || options.size % SECTOR !== 0) {
    throw new UsageError(`a VMDK's size must be a positive multiple of 512 bytes; ${options.size} is not`);
  }
  if (subformat === 'streamOptimized') return createStream(file, options);
  if (subformat === 'monolithicFlat' || subformat === 'vmfs') return createFlat(file, opener, options, subformat);
  return createSparse(file, options);
}

async function openWritable(file: RandomAccessFile, opener: FileOpener): Promise<DiskWriter> {
  const head = new Uint8Array(Math.min(await file.size(), 4096));
  await file.read(head, 0);
  const kind = sniff(head);
  if (kind === 'sparse') return openSparseWritable(file);
  if (kind === 'descriptor') return openFlatWritable(file, opener);
  // the reader gives the typed refusal (foreign bytes, COWD)
  await openLayout(file, opener, 'r');
  throw new UsageError(`${file.path}: this VMDK cannot grow in place`);
}

export const vmdkDriver: FormatDriver = {
  format: 'vmdk',
  probe: probeVmdk,
  open: (file: RandomAccessFile, opener: FileOpener): Promise<DiskImage> => VmdkImage.open(file, opener),
  create,
  openWritable,
  check: (file: RandomAccessFile, opener: FileOpener): Promise<StructureReport> => checkVmdk(file, opener),
};

export { VmdkImage } from './image.js';
export { SUBFORMATS, type VmdkSubformat } from './codec.js';
