/**
 * Small valid disks for the fuzzer, made in memory by our own writers (one per sub-format)
 * and, where qemu-img is installed, by qemu-img: 8 MiB virtual with a few sectors of data,
 * so that nearly every non-zero byte is metadata worth mutating.
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FileOpener, FormatDriver } from '../formats/disk-image.js';
import { MemoryFile } from '../formats/memory-file.js';
import type { FuzzSeed } from './fuzz.js';

const execFileAsync = promisify(execFile);
const SIZE = 8 * 1024 * 1024;

/** What each of our writers can make, by format. */
export const WRITABLE_SUBFORMATS: Record<string, string[]> = {
  vhd: ['dynamic', 'fixed'],
  vhdx: ['dynamic'],
  vmdk: ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'vmfs'],
  qcow2: ['v3'],
};

async function ourSeed(driver: FormatDriver, subformat: string): Promise<FuzzSeed> {
  const name = `seed-${subformat}.${driver.format}`;
  const main = new MemoryFile(name);
  const siblings: Record<string, MemoryFile> = {};
  const opener: FileOpener = async (n) => (siblings[n] ??= new MemoryFile(n));
  const writer = await driver.create!(main, opener, { size: SIZE, subformat, finalName: name, time: 1_700_000_000 });
  const data = Buffer.alloc(1024, 0x5a);
  for (const at of [0, 3 * 1024 * 1024, SIZE - 1024]) await writer.write(data, at);
  await writer.close();
  return {
    name,
    bytes: Buffer.from(main.contents()),
    siblings: Object.fromEntries(Object.entries(siblings).map(([k, f]) => [k, Buffer.from(f.contents())])),
  };
}

/** qemu-img's own disks in each of its sub-formats, with a few sectors written by qemu-io. */
async function qemuSeeds(format: string): Promise<FuzzSeed[]> {
  const variants: Record<string, string[]> = {
    vhd: ['subformat=dynamic', 'subformat=fixed,force_size=on'],
    vhdx: ['subformat=dynamic', 'subformat=dynamic,block_state_zero=off,block_size=1M'],
    vmdk: ['subformat=monolithicSparse', 'subformat=streamOptimized', 'subformat=monolithicFlat'],
    qcow2: ['compat=1.1', 'compat=0.10', 'compat=1.1,cluster_size=4096'],
  };
  const dir = await mkdtemp(join(tmpdir(), 'ik-fuzzseed-'));
  const seeds: FuzzSeed[] = [];
  try {
    let i = 0;
    for (const opt of variants[format] ?? []) {
      const sub = join(dir, String(i++));
      await execFileAsync('mkdir', [sub]);
      const fmt = format === 'vhd' ? 'vpc' : format;
      const file = join(sub, `q.${format}`);
      await execFileAsync('qemu-img', ['create', '-q', '-f', fmt, '-o', opt, file, String(SIZE)]);
      if (!opt.includes('streamOptimized')) {
        await execFileAsync('qemu-io', ['-f', fmt, '-c', 'write -P 0x5a 0 1024', '-c', 'write -P 0x33 3M 4096', file]);
      }
      const bytes = await readFile(file);
      const siblings: Record<string, Buffer> = {};
      for (const f of await readdir(sub)) if (f !== `q.${format}`) siblings[f] = await readFile(join(sub, f));
      seeds.push({ name: `qemu-${opt}.${format}`, bytes, siblings });
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return seeds;
}

export async function fuzzSeeds(driver: FormatDriver, withQemu = true): Promise<FuzzSeed[]> {
  const seeds: FuzzSeed[] = [];
  if (driver.create) for (const s of WRITABLE_SUBFORMATS[driver.format] ?? []) seeds.push(await ourSeed(driver, s));
  if (withQemu) seeds.push(...(await qemuSeeds(driver.format)));
  return seeds;
}
