/**
 * Writing a flat VMDK: a text descriptor (the disk's own file) and the raw bytes in
 * `<name>-flat.vmdk` beside it, reached through the FileOpener. `vmfs` is what ESXi keeps
 * on a datastore; `monolithicFlat` is the hosted (Workstation) spelling of the same thing.
 *
 * A new flat file is pre-sized by truncate, so it stays sparse: all-zero writes above
 * everything written so far are skipped. Growing in place writes into the flat file as
 * given; there is no metadata, so flush() is a sync (plus, once per session, a new CID in
 * the descriptor, as VMware changes it when the content changes).
 */
import { randomBytes } from 'node:crypto';
import { SECTOR } from '../bytes.js';
import type { CreateOptions, DiskWriter, FileOpener } from '../disk-image.js';
import { UsageError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import { flatExtentName, isZero, newDescriptor, serializeDescriptor } from './codec.js';
import { openLayout, readExtents, type ImageExtent } from './image.js';
import { checkWrite, cidField, newCidBytes, type CidField } from './sparse-writer.js';

type FlatExtent = Extract<ImageExtent, { kind: 'flat' }>;

/** Zero runs shorter than this are written anyway: a hole smaller than a filesystem extent saves nothing. */
const ZERO_PIECE = 64 * 1024;

export async function createFlat(file: RandomAccessFile, opener: FileOpener, options: CreateOptions, subformat: 'monolithicFlat' | 'vmfs'): Promise<FlatWriter> {
  const sectors = options.size / SECTOR;
  const name = flatExtentName(options.finalName);
  const descriptor = newDescriptor({
    createType: subformat,
    sectors,
    // ESXi's own spelling for a datastore disk is VMFS; hosted products write FLAT with a start sector
    extentType: subformat === 'vmfs' ? 'VMFS' : 'FLAT',
    access: 'RW',
    fileName: name,
    random: randomBytes(36),
  });
  const text = Buffer.from(serializeDescriptor(descriptor), 'utf8');
  const flat = await opener(name, 'w');
  try {
    // libvmdk refuses a flat file shorter than the descriptor says; truncate sizes it without using space
    await flat.truncate(options.size);
    await file.write(text, 0);
    await file.truncate(text.length);
  } catch (e) {
    await flat.close().catch(() => {});
    throw e;
  }
  const line = descriptor.extents[0]!;
  const extent: FlatExtent = { kind: 'flat', start: 0, length: options.size, file: flat, fileStart: 0, fileSize: options.size, line };
  return new FlatWriter(file, [extent], subformat, true, null);
}

export async function openFlatWritable(file: RandomAccessFile, opener: FileOpener): Promise<FlatWriter> {
  const layout = await openLayout(file, opener, 'r+');
  const flats: FlatExtent[] = [];
  for (const e of layout.extents) {
    if (e.kind !== 'flat') {
      for (const f of layout.files.slice(1)) await f.close().catch(() => {});
      throw new UsageError(
        `${file.path}: a ${layout.subformat} VMDK with a ${e.kind === 'zero' ? 'ZERO' : 'SPARSE'} extent; we grow in place only monolithicSparse, monolithicFlat and vmfs disks`,
      );
    }
    flats.push(e);
  }
  const cid = layout.descriptorText === null ? null : cidField(layout.descriptorText);
  return new FlatWriter(file, flats, layout.subformat, false, cid);
}

export class FlatWriter implements DiskWriter {
  readonly format = 'vmdk';
  readonly size: number;
  /** Bytes below this have been written in this session; above it a new flat file is still all holes. */
  private highWater = 0;
  private dataWritten = false;

  constructor(
    private readonly descriptorFile: RandomAccessFile,
    private readonly extents: FlatExtent[],
    readonly subformat: string,
    /** A flat file just created by truncate: zeros need not be written where nothing was. */
    private readonly fresh: boolean,
    /** The descriptor's CID, replaced once per session when content changes (null: a new disk). */
    private cid: CidField | null,
  ) {
    this.size = extents.reduce((n, e) => n + e.length, 0);
  }

  async write(from: Uint8Array, at: number): Promise<void> {
    checkWrite(from, at, this.size, this.descriptorFile.path);
    if (!this.fresh || at < this.highWater) {
      this.highWater = Math.max(this.highWater, at + from.length);
      await this.put(from, at);
      return;
    }
    // above everything written so far a new flat file is holes: leave its zero pieces out
    let runStart = -1;
    for (let p = 0; p < from.length; ) {
      const n = Math.min(ZERO_PIECE - ((at + p) % ZERO_PIECE), from.length - p);
      const zero = isZero(from.subarray(p, p + n));
      if (!zero && runStart < 0) runStart = p;
      if (zero && runStart >= 0) {
        await this.put(from.subarray(runStart, p), at + runStart);
        runStart = -1;
      }
      p += n;
    }
    if (runStart >= 0) await this.put(from.subarray(runStart), at + runStart);
    this.highWater = at + from.length;
  }

  private async put(from: Uint8Array, at: number): Promise<void> {
    let done = 0;
    for (const e of this.extents) {
      if (done >= from.length) break;
      const pos = at + done;
      if (pos >= e.start + e.length) continue;
      const n = Math.min(e.start + e.length - pos, from.length - done);
      await e.file.write(from.subarray(done, done + n), e.fileStart + pos - e.start);
      done += n;
    }
    this.dataWritten = true;
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return readExtents(this.extents, this.size, into, at);
  }

  async flush(): Promise<void> {
    if (!this.dataWritten) return;
    for (const e of this.extents) await e.file.flush();
    if (this.cid) {
      await this.descriptorFile.write(newCidBytes(this.cid.digits), this.cid.at);
      await this.descriptorFile.flush();
      this.cid = null;
    }
    this.dataWritten = false;
  }

  async close(): Promise<void> {
    await this.flush();
    await this.closeFiles();
  }

  async abort(): Promise<void> {
    await this.closeFiles();
  }

  private async closeFiles(): Promise<void> {
    for (const e of this.extents) await e.file.close();
    await this.descriptorFile.close();
  }
}
