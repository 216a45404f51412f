/**
 * Writes one image in a single sequential pass under a temporary name: header, records as
 * batches arrive, then index and trailer. `commit` makes it durable and visible: fsync,
 * the .md5 sidecar (itself via a temporary name), then the rename to the final name.
 * Until then nothing carries a final name; `abort` removes the temporary file.
 */
import { createHash, type Hash } from 'node:crypto';
import { utimes } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { LocalFile } from '../../formats/local-file.js';
import { durableFlush, durableRename, durableUnlink, durableWrite, syncDir, tempPathFor, writeFileAtomic } from '../durable.js';
import { OUT_DATA, OUT_ZERO, type BatchResult } from './block-batch.js';
import {
  DIGEST_SIZE, ENTRY_ZERO, HEADER_SIZE, emptyIndex, encodeHeader, encodeIndex, encodeTrailer,
  type ImageHeader, type ImageIndex,
} from './layout.js';
import { md5SidecarText, sidecarPathFor } from '../sidecar.js';

export interface CommittedImage {
  path: string;
  md5: string;
  bytes: number;
  dataBlocks: number;
  zeroBlocks: number;
}

export class ImageWriter {
  private offset = HEADER_SIZE;
  private readonly md5: Hash = createHash('md5');
  private index: ImageIndex = emptyIndex(1024);
  private dataBlocks = 0;
  private zeroBlocks = 0;
  private finished = false;

  private constructor(readonly finalPath: string, readonly tempPath: string, private readonly file: LocalFile, readonly header: ImageHeader) {}

  static async create(finalPath: string, header: ImageHeader): Promise<ImageWriter> {
    const tempPath = tempPathFor(finalPath);
    const file = await LocalFile.open(tempPath, 'wx');
    const w = new ImageWriter(finalPath, tempPath, file, header);
    const hb = encodeHeader(header);
    w.md5.update(hb);
    await durableWrite(file, hb, 0);
    return w;
  }

  private grow(need: number): void {
    if (need <= this.index.blocks.length) return;
    const cap = Math.max(need, this.index.blocks.length * 2);
    const bigger = emptyIndex(cap);
    bigger.blocks.set(this.index.blocks);
    bigger.offsets.set(this.index.offsets);
    bigger.storedLengths.set(this.index.storedLengths);
    bigger.flags.set(this.index.flags);
    bigger.digests.set(this.index.digests);
    bigger.count = this.index.count;
    this.index = bigger;
  }

  /** Adds an index entry for one block; data entries must come in the order their records were appended. */
  private addEntry(block: number, storedLength: number, flags: number, digest: Uint8Array | null): void {
    this.grow(this.index.count + 1);
    const i = this.index.count++;
    this.index.blocks[i] = block;
    this.index.offsets[i] = this.offset;
    this.index.storedLengths[i] = storedLength;
    this.index.flags[i] = flags;
    if (digest) this.index.digests.set(digest, i * DIGEST_SIZE);
  }

  /** Appends a batch from the block workers (blocks firstBlock..). */
  async appendBatch(firstBlock: number, r: BatchResult): Promise<void> {
    await this.flushPending();
    for (let i = 0; i < r.kinds.length; i++) {
      const kind = r.kinds[i];
      if (kind === OUT_ZERO) {
        this.addEntry(firstBlock + i, 0, ENTRY_ZERO, null);
        this.zeroBlocks++;
      } else if (kind === OUT_DATA) {
        const len = r.lengths[i]!;
        this.addEntry(firstBlock + i, len, r.methods[i]! << 8, r.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE));
        this.offset += len;
        this.dataBlocks++;
      }
    }
    if (r.records.length > 0) {
      this.md5.update(r.records);
      await durableWrite(this.file, r.records, this.offset - r.records.length);
    }
  }

  /**
   * Appends one already-encoded record (records copied between images by a collapse).
   * Records are gathered into writes of about 4 MiB: fewer syscalls and durable steps.
   */
  async appendRecord(block: number, record: Uint8Array, flags: number, digest: Uint8Array): Promise<void> {
    this.addEntry(block, record.length, flags, digest);
    this.offset += record.length;
    this.dataBlocks++;
    this.md5.update(record);
    this.pending.push(record);
    this.pendingBytes += record.length;
    if (this.pendingBytes >= 4 * 1024 * 1024) await this.flushPending();
  }

  private pending: Uint8Array[] = [];
  private pendingBytes = 0;

  private async flushPending(): Promise<void> {
    if (this.pendingBytes === 0) return;
    const data = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    await durableWrite(this.file, data, this.offset - data.length);
  }

  appendZero(block: number): void {
    this.addEntry(block, 0, ENTRY_ZERO, null);
    this.zeroBlocks++;
  }

  /** Index, trailer, fsync, sidecar, rename. Returns what was committed. */
  async commit(opts: { mtime: Date; sidecarTime?: Date }): Promise<CommittedImage> {
    await this.flushPending();
    const indexBytes = encodeIndex(this.index);
    const trailer = encodeTrailer({
      indexOffset: this.offset,
      indexLength: indexBytes.length,
      dataBytes: this.offset - HEADER_SIZE,
      indexChecksum: createHash('sha256').update(indexBytes).digest(),
    });
    this.md5.update(indexBytes).update(trailer);
    await durableWrite(this.file, indexBytes, this.offset);
    await durableWrite(this.file, trailer, this.offset + indexBytes.length);
    const bytes = this.offset + indexBytes.length + trailer.length;
    await durableFlush(this.file);
    await this.file.close();
    this.finished = true;
    const md5 = this.md5.digest('hex');
    await utimes(this.tempPath, opts.mtime, opts.mtime);
    // The sidecar lands first: a crash between the two renames leaves an .md5 without
    // its image (garbage that `process` removes), never an image without its .md5.
    await writeFileAtomic(sidecarPathFor(this.finalPath), Buffer.from(md5SidecarText(md5, basename(this.finalPath))), opts.sidecarTime ?? opts.mtime);
    await durableRename(this.tempPath, this.finalPath);
    await syncDir(dirname(this.finalPath));
    return { path: this.finalPath, md5, bytes, dataBlocks: this.dataBlocks, zeroBlocks: this.zeroBlocks };
  }

  async abort(): Promise<void> {
    if (!this.finished) {
      this.finished = true;
      await this.file.close().catch(() => {});
    }
    await durableUnlink(this.tempPath).catch(() => {});
  }
}
