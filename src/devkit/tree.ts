/**
 * File trees on a mounted (or extracted) volume: the initial file set, random changes,
 * filling free space, and listing with checksums. Everything here works on a plain
 * directory, so the same code drives fuse2fs, ntfs-3g and the mtools-backed FAT view.
 *
 * Determinism: every choice comes from the caller's `Prng`, and directory listings are
 * sorted by code point (never by locale), so the same seed on the same tree does the same
 * thing on any machine.
 */
import { createHash } from 'node:crypto';
import { mkdir, open, readdir, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Prng } from './prng.js';
import { sha256File } from './region.js';

export type FileKind = 'bin' | 'txt' | 'dat';

export interface TreeFile {
  /** Path relative to the volume root, with '/' separators. */
  path: string;
  size: number;
  sha256: string;
}

const WORDS = (
  'alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa ' +
  'quebec romeo sierra tango uniform victor whiskey xray yankee zulu block image chain backup disk ' +
  'sector volume layer merge restore verify snapshot journal extent inode cluster bitmap header ' +
  'the of and to in is that for it as with on by at from'
).split(' ');
const DIR_WORDS = ['docs', 'photos', 'src', 'logs', 'cache', 'projects', 'music', 'archive', 'config', 'tmp', 'users', 'data'];
const MiB = 1024 * 1024;

function byCodePoint(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Content of `size` bytes of the given kind. `txt` compresses well, `dat` is mostly zeros. */
export function makeContent(rng: Prng, kind: FileKind, size: number): Buffer {
  if (kind === 'bin') return rng.bytes(size);
  if (kind === 'dat') {
    // Zeros with a random 4 KiB run every 64 KiB: compressible, and holes a sparse-aware reader can skip.
    const buf = Buffer.alloc(size);
    const noise = rng.stream();
    for (let at = rng.int(0, 65536); at < size; at += 65536) noise.next(Math.min(4096, size - at)).copy(buf, at);
    return buf;
  }
  // Runs of lines copied from a fixed pool: text-like, compresses several-fold, and fast
  // (building words one by one ran at ~6 MB/s; copying runs is memory speed).
  const pool = textPool();
  const out = Buffer.allocUnsafe(size);
  for (let pos = 0; pos < size; ) {
    const start = pool.lineStarts[rng.int(0, pool.lineStarts.length)] as number;
    const n = Math.min(rng.int(64, 4096), pool.text.length - start, size - pos);
    pool.text.copy(out, pos, start, start + n);
    pos += n;
  }
  return out;
}

let pool: { text: Buffer; lineStarts: number[] } | undefined;

/** About 256 KiB of word salad, the same for every seed (its own fixed generator). */
function textPool(): { text: Buffer; lineStarts: number[] } {
  if (pool) return pool;
  const rng = new Prng(0x7e47);
  const lines: string[] = [];
  const lineStarts: number[] = [];
  let length = 0;
  while (length < 256 * 1024) {
    const words: string[] = [];
    const count = rng.int(4, 16);
    for (let i = 0; i < count; i++) words.push(rng.pick(WORDS));
    const line = `${rng.int(0, 100000)} ${words.join(' ')}\n`;
    lineStarts.push(length);
    lines.push(line);
    length += line.length;
  }
  pool = { text: Buffer.from(lines.join(''), 'latin1'), lineStarts };
  return pool;
}

function kindOf(path: string): FileKind {
  if (path.endsWith('.txt')) return 'txt';
  if (path.endsWith('.dat')) return 'dat';
  return 'bin';
}

function pickKind(rng: Prng): FileKind {
  const r = rng.float();
  return r < 0.45 ? 'bin' : r < 0.9 ? 'txt' : 'dat';
}

/** A file size from a few bytes to `max`, spread over orders of magnitude. */
function pickSize(rng: Prng, max: number): number {
  if (max <= 0) return 0;
  if (rng.chance(0.03)) return 0;
  return rng.logInt(1, max);
}

/** Regular files under `root`, sorted, as paths relative to it. Skips ext4's lost+found. */
export async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    const entries = await readdir(rel ? join(root, rel) : root, { withFileTypes: true });
    entries.sort((a, b) => byCodePoint(a.name, b.name));
    for (const e of entries) {
      const p = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        if (p !== 'lost+found') await walk(p);
      } else if (e.isFile()) out.push(p);
    }
  };
  await walk('');
  return out;
}

/** Directories under `root` (including '' for the root itself), sorted. */
export async function listDirs(root: string): Promise<string[]> {
  const out: string[] = [''];
  const walk = async (rel: string): Promise<void> => {
    const entries = await readdir(rel ? join(root, rel) : root, { withFileTypes: true });
    entries.sort((a, b) => byCodePoint(a.name, b.name));
    for (const e of entries) {
      const p = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory() && p !== 'lost+found') {
        out.push(p);
        await walk(p);
      }
    }
  };
  await walk('');
  return out;
}

/** Every regular file under `root` with its size and sha256, sorted by path. */
export async function hashTree(root: string): Promise<TreeFile[]> {
  const files = await listFiles(root);
  const out: TreeFile[] = [];
  for (const path of files) {
    const full = join(root, path);
    out.push({ path, size: (await stat(full)).size, sha256: await sha256File(full) });
  }
  return out;
}

export interface PopulateOptions {
  /** Number of files. */
  files: number;
  /** Total bytes of content, roughly (the last files are cut to fit). */
  bytes: number;
  /** Largest single file. */
  maxFileSize?: number;
}

/** Writes a fresh nested file set under `root` (an empty directory); returns what it wrote. */
export async function populate(root: string, rng: Prng, opts: PopulateOptions): Promise<TreeFile[]> {
  const maxFile = opts.maxFileSize ?? 4 * MiB;
  const dirs: string[] = [''];
  const dirCount = Math.max(1, Math.round(opts.files / 6));
  for (let i = 0; i < dirCount; i++) {
    // Nest under a random existing directory, at most 4 deep.
    const candidates = dirs.filter((d) => d.split('/').length < 4 || d === '');
    const parent = rng.pick(candidates);
    const name = `${rng.pick(DIR_WORDS)}-${i}`;
    const dir = parent ? `${parent}/${name}` : name;
    await mkdir(join(root, dir), { recursive: true });
    dirs.push(dir);
  }
  const written: TreeFile[] = [];
  let budget = opts.bytes;
  for (let i = 0; i < opts.files; i++) {
    const kind = pickKind(rng);
    // Keep a few KiB per remaining file so the budget does not run dry halfway.
    const remaining = opts.files - i;
    const spare = budget - (remaining - 1) * 4096;
    const cap = spare > 4096 ? Math.min(maxFile, spare) : Math.max(0, Math.floor(Math.min(4096, budget / remaining)));
    const size = pickSize(rng, cap);
    budget -= size;
    const dir = rng.pick(dirs);
    const path = `${dir ? `${dir}/` : ''}${rng.pick(WORDS)}-${i}.${kind}`;
    const data = makeContent(rng, kind, size);
    await writeWhole(join(root, path), data);
    written.push({ path, size, sha256: createHash('sha256').update(data).digest('hex') });
  }
  written.sort((a, b) => byCodePoint(a.path, b.path));
  return written;
}

async function writeWhole(path: string, data: Buffer): Promise<void> {
  const fh = await open(path, 'w');
  try {
    // 1 MiB writes: the FUSE daemons run with big_writes and this keeps each request large.
    for (let at = 0; at < data.length; at += MiB) await fh.write(data, at, Math.min(MiB, data.length - at), at);
  } finally {
    await fh.close();
  }
}

export type MutationKind = 'create' | 'rewrite' | 'append' | 'remove';

export interface MutationOp {
  partition: number;
  op: MutationKind;
  path: string;
  /** Where the write started (rewrite and append), in bytes from the start of the file. */
  offset?: number;
  /** Bytes written (0 for remove). */
  bytes: number;
  /** The volume filled up during this op: the file may hold only part of the bytes. */
  incomplete?: boolean;
}

export interface MutationPlan {
  create: number;
  modify: number;
  remove: number;
  bytes: number;
}

function isNoSpace(err: unknown): boolean {
  return (err as { code?: string } | null)?.code === 'ENOSPC';
}

/**
 * Applies `plan` to the tree under `root`: creates files (sometimes in a new directory),
 * rewrites a range of or appends to existing ones, and deletes some. A write that would
 * leave less than 1 MiB free (by `freeBytes`) is skipped; a write that still fails with
 * ENOSPC ends the round, reported with `incomplete`. Returns what it did, in order.
 */
export async function mutateTree(
  root: string,
  rng: Prng,
  partition: number,
  plan: MutationPlan,
  freeBytes?: () => Promise<number>,
): Promise<MutationOp[]> {
  const files = await listFiles(root);
  const dirs = await listDirs(root);
  const writes = plan.create + plan.modify;
  // Each write gets a share of the byte budget, varied by ±75 %, so the round writes about `bytes`.
  const share = writes > 0 ? plan.bytes / writes : 0;
  const sizeFor = (): number => (rng.chance(0.2) ? rng.int(1, 200) : Math.max(1, Math.round(share * (0.25 + 1.5 * rng.float()))));
  const kinds: MutationKind[] = [
    ...Array<MutationKind>(plan.create).fill('create'),
    ...Array<MutationKind>(plan.modify).fill('rewrite'),
    ...Array<MutationKind>(plan.remove).fill('remove'),
  ];
  // Shuffle so removals and writes interleave (Fisher-Yates).
  for (let i = kinds.length - 1; i > 0; i--) {
    const j = rng.int(0, i + 1);
    [kinds[i], kinds[j]] = [kinds[j] as MutationKind, kinds[i] as MutationKind];
  }
  const done: MutationOp[] = [];
  // Leave this much free, so filesystem metadata never runs out in the middle of an op.
  const fits = async (n: number): Promise<boolean> => (freeBytes ? (await freeBytes()) >= n + MiB : true);
  let current: MutationOp | undefined;
  try {
    for (const kind of kinds) {
      current = undefined;
      if (kind === 'remove' && files.length === 0) continue;
      if (kind === 'create' || files.length === 0) {
        let dir = rng.pick(dirs);
        const newDir = rng.chance(0.2) ? `${dir ? `${dir}/` : ''}${rng.pick(DIR_WORDS)}-${rng.hex(4)}` : undefined;
        const fileKind = pickKind(rng);
        const name = `${rng.pick(WORDS)}-${rng.hex(6)}.${fileKind}`;
        const data = makeContent(rng, fileKind, sizeFor());
        if (!(await fits(data.length))) continue;
        if (newDir) {
          await mkdir(join(root, newDir), { recursive: true });
          dirs.push(newDir);
          dir = newDir;
        }
        const path = `${dir ? `${dir}/` : ''}${name}`;
        current = { partition, op: 'create', path, bytes: data.length };
        done.push(current);
        files.push(path);
        await writeWhole(join(root, path), data);
      } else if (kind === 'remove') {
        const index = rng.int(0, files.length);
        const path = files[index] as string;
        current = { partition, op: 'remove', path, bytes: 0 };
        done.push(current);
        files.splice(index, 1);
        await unlink(join(root, path));
      } else {
        const path = rng.pick(files);
        const full = join(root, path);
        const size = (await stat(full)).size;
        const append = size === 0 || rng.chance(0.4);
        const length = sizeFor();
        const offset = append ? size : rng.int(0, size);
        const data = makeContent(rng, kindOf(path), length);
        if (!(await fits(data.length))) continue;
        current = { partition, op: append ? 'append' : 'rewrite', path, offset, bytes: data.length };
        done.push(current);
        const fh = await open(full, 'r+');
        try {
          for (let at = 0; at < data.length; at += MiB) await fh.write(data, at, Math.min(MiB, data.length - at), offset + at);
        } finally {
          await fh.close();
        }
      }
    }
  } catch (err) {
    if (!isNoSpace(err)) throw err;
    // The volume filled up despite the check: report the op as begun but not finished.
    if (current) current.incomplete = true;
  }
  return done;
}

/**
 * Writes random-data files named `.fill-N` at the root until `freeBytes()` says less than
 * 1 MiB is left or a write fails with ENOSPC. Returns their paths and the bytes written.
 */
export async function fillTree(root: string, rng: Prng, freeBytes: () => Promise<number>): Promise<{ paths: string[]; bytes: number }> {
  const stream = rng.stream();
  const paths: string[] = [];
  let bytes = 0;
  for (let i = 0; ; i++) {
    const free = await freeBytes();
    if (free < MiB) break;
    const path = `.fill-${i}`;
    paths.push(path);
    const fh = await open(join(root, path), 'w');
    let full = false;
    try {
      const target = Math.min(64 * MiB, free);
      for (let at = 0; at < target; at += MiB) {
        const n = Math.min(MiB, target - at);
        await fh.write(stream.next(n), 0, n, at);
        bytes += n;
      }
    } catch (err) {
      if (!isNoSpace(err)) throw err;
      full = true;
    } finally {
      await fh.close().catch((err: unknown) => {
        if (!isNoSpace(err)) throw err;
        full = true;
      });
    }
    if (full) break;
  }
  return { paths, bytes };
}

export async function removeFiles(root: string, paths: string[]): Promise<void> {
  for (const p of paths) await rm(join(root, p), { force: true });
}
