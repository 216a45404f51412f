// Fixture and oracle helpers for the allocation tests: run the real tools (mkfs, dumpe2fs,
// ntfs-3g, fuse2fs...), make deterministic file trees, hash trees, and overwrite byte
// ranges of an image with garbage.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { mkdtemp, mkdir, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { promisify } from 'node:util';
import type { BlockDevice, ByteRange } from '../../src/formats/types.js';

const execFileP = promisify(execFile);

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a tool; never throws on a non-zero exit (the caller asserts on `code`). */
export async function run(cmd: string, args: string[], opts: { input?: string } = {}): Promise<RunResult> {
  if (opts.input !== undefined) {
    return new Promise((resolve, reject) => {
      const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
      child.stdin.end(opts.input);
    });
  }
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { maxBuffer: 256 * 1024 * 1024 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** Runs a tool that must succeed; throws with its output otherwise. */
export async function must(cmd: string, args: string[], opts: { input?: string } = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${(r.stderr + r.stdout).slice(-600)}`);
  return r.stdout;
}

/** A fresh directory under the OS temp dir; `cleanup` removes it. */
export async function tempDir(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), `imagekeep-${prefix}-`));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Deterministic pseudo-random bytes (AES-CTR keystream of a seed). */
export function pseudoRandom(seed: string, length: number): Buffer {
  const key = createHash('sha256').update(seed).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(length)), cipher.final()]);
}

export interface TreeFile {
  path: string;
  size: number;
  /** Leave a hole of this many bytes in the middle (written with a seek). */
  hole?: number;
}

/** A spread of small, medium and large files in nested directories. */
export function standardTree(scale: number): TreeFile[] {
  const files: TreeFile[] = [];
  for (let i = 0; i < 24; i++) files.push({ path: `small/s${i}.bin`, size: 700 + i * 2311 });
  for (let i = 0; i < 6; i++) files.push({ path: `dir${i % 3}/sub/m${i}.bin`, size: Math.round((1 + i) * 512 * 1024 * scale) });
  files.push({ path: 'big/large.bin', size: Math.round(12 * 1024 * 1024 * scale) });
  files.push({ path: 'big/sparse.bin', size: Math.round(2 * 1024 * 1024 * scale), hole: Math.round(3 * 1024 * 1024 * scale) });
  files.push({ path: 'empty.txt', size: 0 });
  return files;
}

/** Writes `files` under `root`; content depends only on the path. */
export async function writeTree(root: string, files: TreeFile[]): Promise<void> {
  for (const f of files) {
    const p = join(root, f.path);
    await mkdir(join(p, '..'), { recursive: true });
    const data = pseudoRandom(f.path, f.size);
    if (f.hole) {
      const half = Math.floor(f.size / 2);
      const fh = await open(p, 'w');
      try {
        await fh.write(data, 0, half, 0);
        await fh.write(data, half, f.size - half, half + f.hole);
      } finally {
        await fh.close();
      }
    } else {
      await writeFile(p, data);
    }
  }
}

/** sha256 of every regular file under `root`, keyed by relative path. */
export async function hashTree(root: string, skip: (rel: string) => boolean = () => false): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      const rel = relative(root, p);
      if (skip(rel)) continue;
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) out.set(rel, createHash('sha256').update(await readFile(p)).digest('hex'));
    }
  };
  await walk(root);
  return out;
}

/** Overwrites every range of the image file with pseudo-random garbage. */
export async function garbageFill(image: string, ranges: ByteRange[], seed = 'garbage'): Promise<number> {
  const fh = await open(image, 'r+');
  let written = 0;
  const chunk = pseudoRandom(seed, 4 * 1024 * 1024);
  try {
    for (const r of ranges) {
      for (let done = 0; done < r.length; ) {
        const n = Math.min(chunk.length, r.length - done);
        await fh.write(chunk, 0, n, r.offset + done);
        done += n;
        written += n;
      }
    }
  } finally {
    await fh.close();
  }
  return written;
}

/** A FUSE filesystem served by a foreground child; `unmount` waits until the child has exited (and flushed). */
export interface FuseMount {
  dir: string;
  unmount: () => Promise<void>;
}

async function isMounted(dir: string): Promise<boolean> {
  const mounts = await readFile('/proc/mounts', 'utf8');
  return mounts.split('\n').some((l) => l.split(' ')[1] === dir);
}

/** `ntfs-3g` (kind 'ntfs') or `fuse2fs` (kind 'ext') serving `image` at `dir`, in the foreground. */
export async function fuseMount(kind: 'ntfs' | 'ext', image: string, dir: string, readOnly: boolean): Promise<FuseMount> {
  await mkdir(dir, { recursive: true });
  const args =
    kind === 'ntfs'
      ? [image, dir, '-o', `no_detach${readOnly ? ',ro' : ''}`]
      : [image, dir, '-f', '-o', readOnly ? 'ro' : 'rw'];
  const child: ChildProcess = spawn(kind === 'ntfs' ? 'ntfs-3g' : 'fuse2fs', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number>((resolve) => child.on('exit', (code) => resolve(code ?? -1)));
  let done = false;
  void exited.then(() => (done = true));
  for (let i = 0; i < 200 && !(await isMounted(dir)); i++) {
    if (done) throw new Error(`${kind} mount of ${image} failed: ${stderr.slice(-600)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!(await isMounted(dir))) {
    child.kill();
    throw new Error(`${kind} mount of ${image} did not appear: ${stderr.slice(-600)}`);
  }
  return {
    dir,
    unmount: async () => {
      if (await isMounted(dir)) await must('fusermount', ['-u', dir]);
      const code = await exited;
      if (code !== 0) throw new Error(`${kind} for ${image} exited ${code}: ${stderr}`);
    },
  };
}

/** Free block numbers per dumpe2fs (all groups, BLOCK_UNINIT ones included), as [first, last] runs. */
export async function dumpe2fsFree(image: string): Promise<{ blockSize: number; freeBlocks: number; runs: [number, number][]; uninitGroups: number }> {
  const header = await must('dumpe2fs', ['-h', image]);
  const blockSize = Number(/^Block size:\s+(\d+)/m.exec(header)?.[1]);
  const freeBlocks = Number(/^Free blocks:\s+(\d+)/m.exec(header)?.[1]);
  const full = await must('dumpe2fs', [image]);
  const runs: [number, number][] = [];
  for (const m of full.matchAll(/^ {2}Free blocks: (.*)$/gm)) {
    for (const part of m[1].split(',').map((s) => s.trim()).filter(Boolean)) {
      const [a, b] = part.split('-').map(Number);
      runs.push([a, b ?? a]);
    }
  }
  const uninitGroups = [...full.matchAll(/^Group \d+:.*BLOCK_UNINIT/gm)].length;
  return { blockSize, freeBlocks, runs, uninitGroups };
}

/** Byte ranges of runs of blocks, merged. */
export function blockRunsToRanges(runs: [number, number][], blockSize: number, base = 0): ByteRange[] {
  const out: ByteRange[] = [];
  for (const [a, b] of [...runs].sort((x, y) => x[0] - y[0])) {
    const offset = base + a * blockSize;
    const length = (b - a + 1) * blockSize;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length });
  }
  return out;
}

/** `ntfscluster -i`'s count of free bytes (libntfs-3g reading $Bitmap). */
export async function ntfsFreeBytes(image: string): Promise<number> {
  const out = await must('ntfscluster', ['-i', image]);
  const m = /bytes of free space\s*:\s*(\d+)/.exec(out);
  if (!m) throw new Error(`ntfscluster -i printed no free space: ${out}`);
  return Number(m[1]);
}

/** Copies an image keeping holes. */
export async function copySparse(from: string, to: string): Promise<void> {
  await must('cp', ['--sparse=always', from, to]);
}

/** A BlockDevice over bytes in memory (for fuzzing: mutate the buffer, read again). */
export class MemoryDevice implements BlockDevice {
  readonly size: number;
  reads = 0;
  constructor(readonly bytes: Uint8Array) {
    this.size = bytes.length;
  }
  async read(into: Uint8Array, at: number): Promise<void> {
    if (at < 0 || at + into.length > this.size) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the device size ${this.size}`);
    }
    this.reads++;
    into.set(this.bytes.subarray(at, at + into.length));
  }
  async close(): Promise<void> {}
}
