/**
 * The registry of every format imagekeep reads and writes, most specific probes first and
 * raw (which accepts anything) last.
 */
import { FormatRegistry } from './registry.js';
import { rawDriver } from './raw.js';
import { vhdDriver } from './vhd/index.js';
import { vhdxDriver } from './vhdx/index.js';
import { qcow2Driver } from './qcow2/index.js';
import { vmdkDriver } from './vmdk/index.js';

export const formats = new FormatRegistry([vhdDriver, vhdxDriver, vmdkDriver, qcow2Driver, rawDriver]);
