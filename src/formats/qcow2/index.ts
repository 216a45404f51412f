/**
 * The qcow2 format driver: reads versions 2 and 3 (zero clusters, zlib and zstd compressed
 * clusters, qcow2 or raw backing files), writes version 3 and grows images in place, and
 * checks their structure. Built explicitly by the registry; importing registers nothing.
 */
import type { FormatDriver } from '../disk-image.js';
import { checkQcow2 } from './check.js';
import { looksLikeQcow2 } from './codec.js';
import { Qcow2Image } from './reader.js';
import { Qcow2Writer } from './writer.js';

export const qcow2Driver: FormatDriver = {
  format: 'qcow2',
  probe(head: Uint8Array): number {
    return looksLikeQcow2(head) ? 100 : 0;
  },
  open: (file, opener) => Qcow2Image.open(file, opener),
  create: (file, opener, options) => Qcow2Writer.create(file, opener, options),
  openWritable: (file, opener) => Qcow2Writer.openWritable(file, opener),
  check: (file, opener) => checkQcow2(file, opener),
};

export { checkQcow2, type Qcow2CheckReport } from './check.js';
export { Qcow2Image } from './reader.js';
export { Qcow2Writer, DEFAULT_CLUSTER_SIZE } from './writer.js';
export { parseHeader, type Qcow2Header } from './codec.js';
