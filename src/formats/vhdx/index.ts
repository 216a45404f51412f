/**
 * The VHDX driver: probe, open (dynamic and fixed, 512 or 4096-byte logical sectors, a pending
 * log replayed in memory), create (dynamic or fixed), grow in place, and our structure check.
 * Differencing VHDX is refused with UnsupportedVersionError.
 */
import type { FormatDriver } from '../disk-image.js';
import { hasFileSignature } from './codec.js';
import { checkVhdx } from './check.js';
import { VhdxImage } from './reader.js';
import { VhdxWriter } from './writer.js';

export const vhdxDriver: FormatDriver = {
  format: 'vhdx',
  // "vhdxfile" at offset 0 is the whole of MS-VHDX's identification; nothing else uses it.
  probe: (head) => (hasFileSignature(head) ? 100 : 0),
  open: (file) => VhdxImage.open(file),
  create: (file, _opener, options) => VhdxWriter.create(file, options),
  openWritable: (file) => VhdxWriter.openWritable(file),
  check: (file) => checkVhdx(file),
};

export { VhdxImage } from './reader.js';
export { VhdxWriter, DEFAULT_BLOCK_SIZE } from './writer.js';
export { checkVhdx } from './check.js';
