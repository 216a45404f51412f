/**
 * The VHD driver: fixed, dynamic and differencing disks read; fixed and dynamic created;
 * dynamic grown in place. Codec in codec.ts, structure judging in structure.ts, reading
 * in reader.ts, writing in writer.ts.
 */
import type { DiskImage, FileOpener, FormatDriver, StructureReport } from '../disk-image.js';
import { ImagekeepError } from '../errors.js';
import type { RandomAccessFile } from '../types.js';
import { DISK_FIXED, decodeFooter, FOOTER_SIZE, footerDefect, hasFooterCookie, uuidText } from './codec.js';
import { openParent, VhdImage } from './reader.js';
import { inspectVhd } from './structure.js';
import { createVhd, openVhdWritable } from './writer.js';

export { VhdImage } from './reader.js';
export { createVhd, openVhdWritable } from './writer.js';
export { inspectVhd, loadVhd, type VhdStructure, type Problem } from './structure.js';

/**
 * A dynamic or differencing VHD starts with its footer copy ("conectix"), as qemu probes;
 * a fixed one ends with it (qemu does not probe those and calls them raw).
 */
function probe(head: Uint8Array, tail: Uint8Array): number {
  if (head.length >= FOOTER_SIZE && hasFooterCookie(head)) {
    return footerDefect(head.subarray(0, FOOTER_SIZE)) === null ? 100 : 90;
  }
  if (tail.length === FOOTER_SIZE && hasFooterCookie(tail)) {
    if (footerDefect(tail) !== null) return 60;
    return decodeFooter(tail).diskType === DISK_FIXED ? 100 : 90;
  }
  return 0;
}

/**
 * Our structure check: what qemu (no `check` for vpc) and libvhdi (no checksums) do not look
 * at. Throws ForeignFormatError for a file that is not a VHD at all.
 */
async function check(file: RandomAccessFile, opener: FileOpener): Promise<StructureReport> {
  const { structure: s, problems } = await inspectVhd(file);
  const report: StructureReport = { problems: problems.map((p) => p.message), layout: {} };
  if (!s) return report;
  const f = s.footer;
  Object.assign(report.layout, {
    subformat: s.subformat,
    virtualSize: s.size,
    fileSize: s.fileSize,
    creator: f.creatorApp,
    creatorVersion: `0x${f.creatorVersion.toString(16).padStart(8, '0')}`,
    creatorHost: f.creatorHostOs,
    cylinders: f.geometry.cylinders,
    heads: f.geometry.heads,
    sectorsPerTrack: f.geometry.sectorsPerTrack,
    uniqueId: uuidText(f.uniqueId),
    footerUsed: s.footerSource === 'head' ? 'copy at 0' : 'trailing copy',
  });
  if (s.header) {
    const h = s.header;
    Object.assign(report.layout, {
      headerOffset: f.dataOffset ?? -1,
      blockSize: s.blockSize,
      bitmapSize: s.bitmapSize,
      batOffset: h.tableOffset,
      batEntries: h.maxTableEntries,
      blocksCovered: s.blockCount,
      allocatedBlocks: s.allocatedBlocks,
      dataEnd: s.dataEnd,
    });
  }
  if (s.subformat === 'differencing' && s.header) {
    const h = s.header;
    Object.assign(report.layout, {
      parentName: h.parentName,
      parentUniqueId: uuidText(h.parentUniqueId),
      parentLocators: s.parentPaths.map((p) => `${p.source}:${p.path}`).join(' | '),
    });
    if (!problems.some((p) => p.fatal)) {
      let parent: DiskImage | null = null;
      try {
        parent = await openParent(file, s, opener, 0);
        report.layout.parentSize = parent.size;
        if (parent.size !== s.size) report.problems.push(`the parent is ${parent.size} bytes but this disk is ${s.size}`);
      } catch (e) {
        if (!(e instanceof ImagekeepError)) throw e;
        report.problems.push(e.message);
      } finally {
        await parent?.close();
      }
    }
  }
  return report;
}

export const vhdDriver: FormatDriver = {
  format: 'vhd',
  probe,
  open: (file, opener) => VhdImage.open(file, opener),
  create: (file, _opener, options) => createVhd(file, options),
  openWritable: (file) => openVhdWritable(file),
  check,
};
