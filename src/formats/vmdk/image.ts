/**
 * Opening a VMDK disk: either one "KDMV" sparse file with its descriptor inside
 * (monolithicSparse, streamOptimized), or a text descriptor whose extents (FLAT, VMFS,
 * SPARSE, ZERO) are files beside it, reached through the FileOpener. The disk is the
 * extents laid end to end. Delta disks (a parent CID, VMFSSPARSE/SESPARSE extents) are
 * refused: read alone they would silently lack their parent's data.
 */
import { SECTOR } from '../bytes.js';
import type { DiskImage, FileOpener } from '../disk-image.js';
import { CorruptImageError, ForeignFormatError, UnsupportedVersionError } from '../errors.js';
import type { ByteRange, RandomAccessFile } from '../types.js';
import {
  MAX_DESCRIPTOR_BYTES,
  hasKdmvMagic,
  hasParent,
  looksLikeDescriptor,
  parseDescriptor,
  type Descriptor,
  type ExtentLine,
} from './codec.js';
import { SparseExtent } from './sparse-extent.js';

export type ImageExtent =
  | { kind: 'sparse'; start: number; length: number; sparse: SparseExtent; line?: ExtentLine }
  | { kind: 'flat'; start: number; length: number; file: RandomAccessFile; fileStart: number; fileSize: number; line: ExtentLine }
  | { kind: 'zero'; start: number; length: number; line: ExtentLine };

export interface VmdkLayout {
  /** The embedded or separate descriptor; null when a sparse file has none (or an unreadable one). */
  descriptor: Descriptor | null;
  /** The descriptor's text (embedded: up to its first NUL), or null when there is none. */
  descriptorText: string | null;
  /** True for one KDMV file carrying its own descriptor and data. */
  embedded: boolean;
  subformat: string;
  size: number;
  extents: ImageExtent[];
  /** Every file opened, the disk's own first; closing the disk closes them all. */
  files: RandomAccessFile[];
}

/** How the first bytes of a file look to us. */
export function sniff(head: Uint8Array): 'sparse' | 'cowd' | 'descriptor' | 'other' {
  if (hasKdmvMagic(head)) return 'sparse';
  if (head.length >= 4 && head[0] === 0x43 && head[1] === 0x4f && head[2] === 0x57 && head[3] === 0x44) return 'cowd';
  const text = Buffer.from(head.subarray(0, Math.min(head.length, 4096))).toString('latin1');
  return looksLikeDescriptor(text) ? 'descriptor' : 'other';
}

/** Opens the layout of a VMDK; `mode` is how extent files beside a descriptor are opened. */
export async function openLayout(file: RandomAccessFile, opener: FileOpener, mode: 'r' | 'r+' = 'r'): Promise<VmdkLayout> {
  const size = await file.size();
  const head = new Uint8Array(Math.min(size, 4096));
  await file.read(head, 0);
  const kind = sniff(head);
  if (kind === 'sparse') return openEmbedded(file);
  if (kind === 'cowd') {
    throw new UnsupportedVersionError(`${file.path}: a "COWD" (ESX 2 / vmfsSparse) extent; we read hosted sparse, streamOptimized and flat VMDKs; convert it on the host with vmkfstools -i ... -d thin`);
  }
  if (kind === 'other') {
    throw new ForeignFormatError(`${file.path}: neither a "KDMV" sparse header nor a "# Disk DescriptorFile" text descriptor at the start; this is not a VMDK`);
  }
  if (size > MAX_DESCRIPTOR_BYTES) {
    throw new ForeignFormatError(`${file.path}: starts like a VMDK descriptor but is ${size} bytes, more than a descriptor's 1 MiB; this is not a VMDK descriptor`);
  }
  const bytes = new Uint8Array(size);
  await file.read(bytes, 0);
  const descriptorText = Buffer.from(bytes).toString('utf8');
  const descriptor = parseDescriptor(descriptorText, file.path);
  refuseDelta(descriptor, file.path);
  const files: RandomAccessFile[] = [file];
  try {
    const extents: ImageExtent[] = [];
    let start = 0;
    for (const line of descriptor.extents) {
      const length = line.sectors * SECTOR;
      extents.push(await openExtent(line, start, opener, mode, files, file.path));
      start += length;
    }
    return { descriptor, descriptorText, embedded: false, subformat: descriptor.createType, size: start, extents, files };
  } catch (e) {
    // the disk's own file belongs to the caller until we return
    for (const f of files.slice(1)) await f.close().catch(() => {});
    throw e;
  }
}

async function openEmbedded(file: RandomAccessFile): Promise<VmdkLayout> {
  const sparse = await SparseExtent.open(file, file.path);
  let descriptor: Descriptor | null = null;
  if (sparse.descriptorText !== null) {
    try {
      descriptor = parseDescriptor(sparse.descriptorText, `${file.path} (embedded descriptor)`);
    } catch {
      // the header alone is enough to read the disk; check() reports the damaged descriptor
      descriptor = null;
    }
  }
  if (descriptor) refuseDelta(descriptor, file.path);
  // as qemu: the header decides (compressed grains: streamOptimized), not the descriptor's createType
  const subformat = sparse.compressed ? 'streamOptimized' : 'monolithicSparse';
  return {
    descriptor,
    descriptorText: sparse.descriptorText,
    embedded: true,
    subformat,
    size: sparse.sizeBytes,
    extents: [{ kind: 'sparse', start: 0, length: sparse.sizeBytes, sparse }],
    files: [file],
  };
}

export function refuseDelta(d: Descriptor, path: string): void {
  if (!hasParent(d)) return;
  const parent = d.parentFileNameHint ? ` of "${d.parentFileNameHint}"` : '';
  throw new UnsupportedVersionError(
    `${path}: a VMDK delta (snapshot) disk${parent} with parentCID ${d.parentCid}; read alone it would lack its parent's data, so consolidate the snapshot or convert the chain (qemu-img convert) first`,
  );
}

async function openExtent(line: ExtentLine, start: number, opener: FileOpener, mode: 'r' | 'r+', files: RandomAccessFile[], where: string): Promise<ImageExtent> {
  const length = line.sectors * SECTOR;
  if (line.type === 'ZERO') return { kind: 'zero', start, length, line };
  if (line.type !== 'SPARSE' && line.type !== 'FLAT' && line.type !== 'VMFS') {
    throw new UnsupportedVersionError(
      `${where}: extent type ${line.type} ("${line.fileName ?? ''}") is not one we read (SPARSE, FLAT, VMFS, ZERO); convert the disk on its host first (vmkfstools -i ... -d thin)`,
    );
  }
  if (line.fileName === undefined || line.fileName === '') {
    throw new CorruptImageError(`${where}: the ${line.type} extent line names no file; the descriptor is damaged`);
  }
  let f: RandomAccessFile;
  try {
    f = await opener(line.fileName, mode);
  } catch (e) {
    throw new CorruptImageError(
      `${where}: cannot open the extent "${line.fileName}" the descriptor names (${e instanceof Error ? e.message : String(e)}); keep the descriptor and its extent files together, under the names the descriptor gives`,
    );
  }
  files.push(f);
  if (line.type === 'SPARSE') {
    const sparse = await SparseExtent.open(f, line.fileName);
    if (sparse.sizeBytes !== length) {
      throw new CorruptImageError(`${where}: the descriptor gives extent "${line.fileName}" ${line.sectors} sectors but its header says ${sparse.header.capacity}; the descriptor does not belong to this extent`);
    }
    return { kind: 'sparse', start, length, sparse, line };
  }
  const fileSize = await f.size();
  const fileStart = line.startSector * SECTOR;
  if (fileSize < fileStart + length) {
    throw new CorruptImageError(
      `${where}: the flat extent "${line.fileName}" is ${fileSize} bytes but the descriptor needs ${fileStart + length} (${line.sectors} sectors from sector ${line.startSector}); the file was truncated or the descriptor is wrong`,
      { fileSize, needed: fileStart + length },
    );
  }
  return { kind: 'flat', start, length, file: f, fileStart, fileSize, line };
}

/** Reads [at, at + into.length) across extents. */
export async function readExtents(extents: readonly ImageExtent[], size: number, into: Uint8Array, at: number): Promise<void> {
  if (at < 0 || at + into.length > size) {
    throw new RangeError(`read of ${into.length} bytes at ${at} passes the disk size ${size}`);
  }
  let done = 0;
  for (const e of extents) {
    if (done >= into.length) break;
    const pos = at + done;
    if (pos >= e.start + e.length || e.length === 0) continue;
    const inExtent = pos - e.start;
    const n = Math.min(e.length - inExtent, into.length - done);
    const dst = into.subarray(done, done + n);
    if (e.kind === 'sparse') await e.sparse.read(dst, inExtent);
    else if (e.kind === 'flat') await e.file.read(dst, e.fileStart + inExtent);
    else dst.fill(0);
    done += n;
  }
}

export class VmdkImage implements DiskImage {
  readonly format = 'vmdk';
  readonly subformat: string;
  readonly size: number;

  constructor(readonly layout: VmdkLayout) {
    this.subformat = layout.subformat;
    this.size = layout.size;
  }

  static async open(file: RandomAccessFile, opener: FileOpener): Promise<VmdkImage> {
    return new VmdkImage(await openLayout(file, opener, 'r'));
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return readExtents(this.layout.extents, this.size, into, at);
  }

  /** Sparse extents: their grains; flat extents: all of them (a file cannot tell its holes here); ZERO: nothing. */
  async allocated(): Promise<ByteRange[]> {
    const out: ByteRange[] = [];
    const add = (offset: number, length: number) => {
      if (length <= 0) return;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === offset) last.length += length;
      else out.push({ offset, length });
    };
    for (const e of this.layout.extents) {
      if (e.kind === 'flat') add(e.start, e.length);
      else if (e.kind === 'sparse') for (const r of await e.sparse.allocatedRanges()) add(e.start + r.offset, r.length);
    }
    return out;
  }

  async close(): Promise<void> {
    for (const f of this.layout.files) await f.close();
  }
}

