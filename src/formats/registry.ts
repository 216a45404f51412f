/**
 * The format registry: which driver reads a file, found by asking every driver how sure it
 * is (qemu's probe scores), and the local FileOpener that lets a disk reach its sibling
 * files. Built explicitly from a list of drivers; nothing registers itself on import.
 */
import { stat } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import type { DiskFormat, DiskImage, FileOpener, FormatDriver } from './disk-image.js';
import { UsageError } from './errors.js';
import { LocalFile } from './local-file.js';
import type { RandomAccessFile } from './types.js';

const HEAD_BYTES = 64 * 1024;
const TAIL_BYTES = 512;

export class FormatRegistry {
  constructor(readonly drivers: readonly FormatDriver[]) {}

  get formats(): DiskFormat[] {
    return this.drivers.map((d) => d.format);
  }

  get(format: string): FormatDriver {
    const d = this.drivers.find((x) => x.format === format);
    if (!d) throw new UsageError(`unknown disk format "${format}"; choose one of ${this.formats.join(', ')}`);
    return d;
  }

  /** The driver most sure the file is its own; raw answers 1, so there is always one. */
  async probe(file: RandomAccessFile): Promise<FormatDriver> {
    const size = await file.size();
    const head = new Uint8Array(Math.min(HEAD_BYTES, size));
    await file.read(head, 0);
    const tail = new Uint8Array(Math.min(TAIL_BYTES, size));
    await file.read(tail, size - tail.length);
    let best: FormatDriver | null = null;
    let bestScore = 0;
    for (const d of this.drivers) {
      const score = d.probe(head, tail);
      if (score > bestScore) {
        best = d;
        bestScore = score;
      }
    }
    if (!best) throw new UsageError(`${file.path}: no format driver recognises this file`);
    return best;
  }

  /**
   * Opens a local disk file (or block device) for reading, in the given format or the
   * probed one. A block device is always raw.
   */
  async openPath(path: string, format?: string): Promise<DiskImage> {
    const st = await stat(path).catch(() => null);
    if (!st) throw new UsageError(`${path} does not exist`);
    if (!st.isFile() && !st.isBlockDevice()) throw new UsageError(`${path} is not a disk image file or a block device`);
    const file = await LocalFile.open(path, 'r');
    try {
      const driver = format ? this.get(format) : st.isBlockDevice() ? this.get('raw') : await this.probe(file);
      return await driver.open(file, localOpener(dirname(path)));
    } catch (e) {
      await file.close().catch(() => {});
      throw e;
    }
  }
}

/** Opens files named relative to `dir` (absolute names as given). */
export function localOpener(dir: string): FileOpener {
  return (name, mode) => LocalFile.open(isAbsolute(name) ? name : join(dir, name), mode);
}
