// Independent readers of virtual disks, run as the tests' oracles: qemu-img, libyal's
// vhdiinfo/vmdkinfo/qcowinfo and ../shared/tools/libyal-compare.py (python bindings under
// /usr/bin/python3). Also makes the raw reference disks those tools compare against.
import { spawn } from 'node:child_process';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { ROOT, prng } from './cli.js';

export const LIBYAL_COMPARE = join(ROOT, '../shared/tools/libyal-compare.py');
export const MKVHDX_FIXTURE = join(ROOT, '../shared/tools/mkvhdx-fixture.py');
export const SAMPLES = join(ROOT, '../shared/samples');

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function runTool(cmd: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
}

/** qemu-img's name for each format: VHD is "vpc". */
export function qemuFormat(format: string): string {
  return format === 'vhd' ? 'vpc' : format;
}

export interface QemuInfo {
  'virtual-size': number;
  format: string;
  'cluster-size'?: number;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  [key: string]: unknown;
}

/** `qemu-img info --output=json -f FMT`; the format is always named (a fixed VHD probes as raw). */
export async function qemuInfo(path: string, format: string): Promise<QemuInfo> {
  const r = await runTool('qemu-img', ['info', '--output=json', '-f', qemuFormat(format), path]);
  if (r.code !== 0) throw new Error(`qemu-img info ${path}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as QemuInfo;
}

/** `qemu-img check`: 0 consistent, 1 internal error, 2 corrupt, 3 leaks only, 63 not supported. */
export function qemuCheck(path: string, format: string): Promise<ToolResult> {
  return runTool('qemu-img', ['check', '--output=json', '-f', qemuFormat(format), path]);
}

/** Formats qemu-img check supports (`man qemu-img`); VHD answers 63. */
export function qemuChecks(format: string): boolean {
  return format === 'vhdx' || format === 'vmdk' || format === 'qcow2';
}

/** `qemu-img compare -f raw -F FMT raw image`: 0 identical, 1 differ, 2+ errors. */
export function qemuCompare(raw: string, path: string, format: string): Promise<ToolResult> {
  return runTool('qemu-img', ['compare', '-f', 'raw', '-F', qemuFormat(format), raw, path]);
}

/** vhdiinfo (VHD, VHDX), vmdkinfo (VMDK), qcowinfo (qcow2). */
export function libyalInfo(path: string, format: string): Promise<ToolResult> {
  const tool = format === 'vmdk' ? 'vmdkinfo' : format === 'qcow2' ? 'qcowinfo' : 'vhdiinfo';
  return runTool(tool, [path]);
}

/** ../shared/tools/libyal-compare.py: 0 identical, 1 differs; a parent image may be given. */
export function libyalCompare(path: string, raw: string, parent?: string): Promise<ToolResult> {
  return runTool('/usr/bin/python3', [LIBYAL_COMPARE, path, raw, ...(parent ? [parent] : [])]);
}

/** `qemu-img convert -f raw -O FMT [-o opts] raw out`. */
export function qemuConvert(raw: string, out: string, format: string, options?: string): Promise<ToolResult> {
  return runTool('qemu-img', ['convert', '-f', 'raw', '-O', qemuFormat(format), ...(options ? ['-o', options] : []), raw, out]);
}

/** `qemu-img convert -f FMT -O raw image out`: the reference reading of a foreign disk. */
export function qemuToRaw(path: string, format: string, out: string): Promise<ToolResult> {
  return runTool('qemu-img', ['convert', '-f', qemuFormat(format), '-O', 'raw', path, out]);
}

export interface ScatteredDisk {
  size: number;
  /** The data extents written, sorted; everything else is a hole (zeros). */
  extents: { offset: number; length: number }[];
}

/**
 * A sparse raw disk of `size` bytes holding `count` random extents of 512 B .. maxLength,
 * sector-aligned, at seeded positions (some straddle 64 KiB, 2 MiB and 32 MiB boundaries),
 * plus data in the first and last sectors so that edges are exercised.
 */
export async function makeScatteredRaw(
  path: string,
  size: number,
  opts: { seed?: number; count?: number; maxLength?: number } = {},
): Promise<ScatteredDisk> {
  const rand = prng(opts.seed ?? 1);
  const count = opts.count ?? 200;
  const maxSectors = Math.max(1, Math.floor((opts.maxLength ?? 256 * 1024) / 512));
  const sectors = size / 512;
  if (!Number.isInteger(sectors)) throw new Error(`size ${size} is not a multiple of 512`);
  const f = await open(path, 'w');
  const extents: { offset: number; length: number }[] = [];
  try {
    await f.truncate(size);
    const place = async (sector: number, n: number) => {
      n = Math.min(n, sectors - sector);
      if (n <= 0) return;
      const data = rand(n * 512);
      await f.write(data, 0, data.length, sector * 512);
      extents.push({ offset: sector * 512, length: n * 512 });
    };
    await place(0, 8);
    await place(sectors - 1, 1);
    for (let i = 0; i < count; i++) {
      const r = rand(8);
      const start = Number(r.readBigUInt64LE(0) % BigInt(sectors));
      const n = 1 + (r.readUInt16LE(0) % maxSectors);
      await place(start, n);
    }
  } finally {
    await f.close();
  }
  extents.sort((a, b) => a.offset - b.offset);
  return { size, extents };
}
