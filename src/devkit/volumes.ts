/**
 * One driver per filesystem, each with the same two operations: `format` a partition of
 * the disk image (optionally filling it from a staging directory) and `open` it as a
 * directory tree, read-only or read-write. What "open" means differs, and that is the
 * point of the drivers:
 *
 * - ext4: fuse2fs mounts the partition in place (`-o offset=`), so writes land in the disk
 *   image directly. mke2fs formats in place too (`-E offset=`) and populates with `-d`.
 * - NTFS: ntfs-3g and mkntfs take no offset, so the partition is copied to a sidecar file,
 *   mounted there, and on close the chunks that changed are copied back (see region.ts).
 *   The sidecar is kept between opens while the disk image does not change behind us.
 * - FAT: there is no FUSE driver installed, so mtools (which takes `image@@offset`) copies
 *   the tree out to a directory; on close the directory is compared with what was copied
 *   out and only the differences are applied with mdel/mrd/mmd/mcopy.
 * - none: an unformatted partition; nothing to open.
 *
 * Closing always unmounts, also after an error in the caller's code, so nothing is left
 * mounted; the changes made up to the error are kept (the filesystem is consistent after
 * an orderly unmount).
 */
import { randomUUID } from 'node:crypto';
import { lstat, mkdtemp, readdir, rm, rmdir, statfs, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { DevkitUsageError, run } from './exec.js';
import { fuseMount, type FuseMount } from './fuse-mount.js';
import type { FsKind, Partition } from './partition.js';
import type { Prng } from './prng.js';
import { copyRegion } from './region.js';
import { listDirs, listFiles } from './tree.js';

export interface VolumeContext {
  /** The disk image. */
  diskPath: string;
  /** A private scratch directory for mount points, sidecars and extracted trees. */
  tmpDir: string;
  /** Live mounts, so the owner can unmount them all after a failure. */
  mounts: Set<FuseMount>;
  /** NTFS sidecars in sync with the disk, by partition offset (see `sidecarFor`). */
  sidecars: Map<number, string>;
}

export interface OpenVolume {
  /** The volume's root directory. */
  readonly root: string;
  /** Bytes a new file could still use (approximate for FAT). */
  freeBytes(): Promise<number>;
  /** Unmounts (and, read-write, brings the changes into the disk image); idempotent. */
  close(): Promise<void>;
}

export interface FormatOptions {
  label: string | undefined;
  /** A directory whose contents become the volume's initial file set. */
  staging: string | undefined;
  rng: Prng;
}

export interface VolumeDriver {
  readonly fs: FsKind;
  format(ctx: VolumeContext, part: Partition, opts: FormatOptions): Promise<void>;
  open(ctx: VolumeContext, part: Partition, mode: 'ro' | 'rw'): Promise<OpenVolume>;
}

async function statfsFree(dir: string): Promise<number> {
  const s = await statfs(dir);
  return s.bavail * s.bsize;
}

function once(fn: () => Promise<void>): () => Promise<void> {
  let p: Promise<void> | undefined;
  return () => (p ??= fn());
}

async function makeSparse(path: string, length: number): Promise<void> {
  await writeFile(path, '');
  await truncate(path, length);
}

async function topLevel(dir: string): Promise<string[]> {
  return (await readdir(dir)).sort().map((name) => join(dir, name));
}

function uuidFor(rng: Prng): string {
  const h = rng.hex(32);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

const EXT_BLOCK = 4096;

export const ext4Driver: VolumeDriver = {
  fs: 'ext4',
  async format(ctx, part, opts) {
    const blocks = Math.floor(part.length / EXT_BLOCK);
    const args = ['-q', '-F', '-t', 'ext4', '-b', String(EXT_BLOCK), '-U', uuidFor(opts.rng)];
    // nodiscard: mke2fs would punch holes in the image file, and must not touch other partitions.
    args.push('-E', `offset=${part.offset},nodiscard,hash_seed=${uuidFor(opts.rng)}`);
    if (opts.label) args.push('-L', opts.label.slice(0, 16));
    if (opts.staging) args.push('-d', opts.staging);
    args.push(ctx.diskPath, String(blocks));
    await run('mkfs.ext4', args);
  },
  async open(ctx, part, mode) {
    const dir = await mkdtemp(join(ctx.tmpDir, `p${part.number}-ext4-`));
    // big_writes: 128 KiB FUSE writes instead of 4 KiB (about 3x faster here).
    const options = [`offset=${part.offset}`, mode, 'big_writes'].join(',');
    let mount: FuseMount;
    try {
      mount = await fuseMount('fuse2fs', [ctx.diskPath, dir, '-f', '-o', options], dir, ctx.mounts);
    } catch (err) {
      await rmdir(dir).catch(() => undefined);
      throw err;
    }
    return {
      root: dir,
      freeBytes: () => statfsFree(dir),
      close: once(async () => {
        await mount.unmount();
        await rmdir(dir);
      }),
    };
  },
};

/**
 * The sidecar holding a copy of an NTFS partition, made on first use and kept in sync: a
 * read-write close copies the changed chunks back, so the next open needs no copy-in. That
 * matters beyond the copy itself: ntfs-3g fsyncs its device when it unmounts, and a freshly
 * copied-in sidecar is hundreds of MiB of dirty pages (about 0.25 s per 512 MiB here).
 * The owner must `dropSidecars` when something else may have written the disk image.
 */
async function sidecarFor(ctx: VolumeContext, part: Partition): Promise<string> {
  const cached = ctx.sidecars.get(part.offset);
  if (cached) return cached;
  const sidecar = join(ctx.tmpDir, `p${part.number}-ntfs-${randomUUID()}.img`);
  try {
    await makeSparse(sidecar, part.length);
    await copyRegion(ctx.diskPath, part.offset, sidecar, 0, part.length, 'skipZeros');
  } catch (err) {
    await rm(sidecar, { force: true });
    throw err;
  }
  ctx.sidecars.set(part.offset, sidecar);
  return sidecar;
}

async function dropSidecar(ctx: VolumeContext, part: Partition): Promise<void> {
  const sidecar = ctx.sidecars.get(part.offset);
  ctx.sidecars.delete(part.offset);
  if (sidecar) await rm(sidecar, { force: true });
}

/** Forgets every cached NTFS sidecar (the disk image changed behind our back). */
export async function dropSidecars(ctx: VolumeContext): Promise<void> {
  const paths = [...ctx.sidecars.values()];
  ctx.sidecars.clear();
  for (const p of paths) await rm(p, { force: true });
}

export const ntfsDriver: VolumeDriver = {
  fs: 'ntfs',
  async format(ctx, part, opts) {
    await dropSidecar(ctx, part);
    const sidecar = join(ctx.tmpDir, `p${part.number}-ntfs-${randomUUID()}.img`);
    try {
      await makeSparse(sidecar, part.length);
      // -p/-H/-S: the boot sector records where the partition starts, as Windows expects.
      const args = ['-F', '-Q', '-q', '-p', String(part.offset / 512), '-H', '255', '-S', '63'];
      if (opts.label) args.push('-L', opts.label);
      args.push(sidecar);
      await run('mkntfs', args);
      if (opts.staging) {
        const dir = await mkdtemp(join(ctx.tmpDir, `p${part.number}-ntfs-`));
        try {
          const mount = await fuseMount('ntfs-3g', ['-o', 'no_detach,big_writes', sidecar, dir], dir, ctx.mounts);
          try {
            const entries = await topLevel(opts.staging);
            if (entries.length > 0) await run('cp', ['-R', '--preserve=timestamps', ...entries, `${dir}/`]);
          } finally {
            await mount.unmount();
          }
        } finally {
          await rmdir(dir).catch(() => undefined);
        }
      }
      await copyRegion(sidecar, 0, ctx.diskPath, part.offset, part.length, 'onlyChanged');
    } catch (err) {
      await rm(sidecar, { force: true });
      throw err;
    }
    ctx.sidecars.set(part.offset, sidecar);
  },
  async open(ctx, part, mode) {
    const dir = await mkdtemp(join(ctx.tmpDir, `p${part.number}-ntfs-`));
    let mount: FuseMount;
    let sidecar: string;
    try {
      sidecar = await sidecarFor(ctx, part);
      const options = mode === 'ro' ? 'no_detach,ro' : 'no_detach,big_writes';
      mount = await fuseMount('ntfs-3g', ['-o', options, sidecar, dir], dir, ctx.mounts);
    } catch (err) {
      await rmdir(dir).catch(() => undefined);
      await dropSidecar(ctx, part);
      throw err;
    }
    return {
      root: dir,
      freeBytes: () => statfsFree(dir),
      close: once(async () => {
        try {
          await mount.unmount();
          if (mode === 'rw') await copyRegion(sidecar, 0, ctx.diskPath, part.offset, part.length, 'onlyChanged');
        } catch (err) {
          // The sidecar may now differ from the disk: never reuse it.
          await dropSidecar(ctx, part);
          throw err;
        } finally {
          await rmdir(dir).catch(() => undefined);
        }
      }),
    };
  },
};

// mtools otherwise refuses images whose geometry fields disagree with their size.
const MTOOLS_ENV = { MTOOLS_SKIP_CHECK: '1' };

function mtoolsImage(ctx: VolumeContext, part: Partition): string {
  return `${ctx.diskPath}@@${part.offset}`;
}

function fatPath(rel: string): string {
  return `::/${rel}`;
}

interface FatGeometry {
  clusterBytes: number;
  freeBytes: number;
}

async function fatGeometry(ctx: VolumeContext, part: Partition): Promise<FatGeometry> {
  const img = mtoolsImage(ctx, part);
  const info = await run('minfo', ['-i', img, '::'], { env: MTOOLS_ENV });
  const sector = Number(/sector size: (\d+) bytes/.exec(info.stdout)?.[1] ?? 512);
  const perCluster = Number(/cluster size: (\d+) sectors/.exec(info.stdout)?.[1] ?? 1);
  // mdir's last line reads "  646 844 416 bytes free" (digits grouped with spaces).
  const dir = await run('mdir', ['-i', img, '::'], { env: MTOOLS_ENV });
  const freeLine = /([\d ]+) bytes free/.exec(dir.stdout)?.[1];
  if (freeLine === undefined) throw new Error(`cannot read free space from mdir output: ${dir.stdout.slice(-200)}`);
  return { clusterBytes: sector * perCluster, freeBytes: Number(freeLine.replace(/ /g, '')) };
}

interface Snapshot {
  files: Map<string, { size: number; ctimeNs: bigint }>;
  dirs: Set<string>;
}

async function snapshot(root: string): Promise<Snapshot> {
  const files = new Map<string, { size: number; ctimeNs: bigint }>();
  for (const path of await listFiles(root)) {
    const s = await lstat(join(root, path), { bigint: true });
    files.set(path, { size: Number(s.size), ctimeNs: s.ctimeNs });
  }
  return { files, dirs: new Set((await listDirs(root)).filter((d) => d !== '')) };
}

export const fatDriver: VolumeDriver = {
  fs: 'fat',
  async format(ctx, part, opts) {
    const sectors = part.offset / 512;
    const args = ['--offset', String(sectors), '-h', String(sectors), '-i', opts.rng.hex(8)];
    if (opts.label) args.push('-n', opts.label.toUpperCase().slice(0, 11));
    args.push(ctx.diskPath, String(Math.floor(part.length / 1024)));
    await run('mkfs.fat', args);
    if (opts.staging) {
      const entries = await topLevel(opts.staging);
      if (entries.length > 0) await run('mcopy', ['-s', '-m', '-D', 'o', '-i', mtoolsImage(ctx, part), ...entries, '::/'], { env: MTOOLS_ENV });
    }
  },
  async open(ctx, part, mode) {
    const img = mtoolsImage(ctx, part);
    const dir = await mkdtemp(join(ctx.tmpDir, `p${part.number}-fat-`));
    let geometry: FatGeometry;
    let before: Snapshot;
    try {
      geometry = await fatGeometry(ctx, part);
      const top = await run('mdir', ['-b', '-i', img, '::/'], { env: MTOOLS_ENV, okCodes: [1] });
      if (top.stdout.trim().length > 0) await run('mcopy', ['-s', '-m', '-n', '-i', img, '::/*', `${dir}/`], { env: MTOOLS_ENV });
      before = await snapshot(dir);
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
    const roundUp = (n: number): number => Math.ceil(n / geometry.clusterBytes) * geometry.clusterBytes;
    return {
      root: dir,
      async freeBytes() {
        // Space the pending changes will take when written back, one cluster of slack per file.
        const now = await snapshot(dir);
        let used = 0;
        for (const [path, f] of now.files) {
          const old = before.files.get(path)?.size;
          if (old !== f.size) used += roundUp(f.size) - roundUp(old ?? 0) + geometry.clusterBytes;
        }
        for (const [path, f] of before.files) if (!now.files.has(path)) used -= roundUp(f.size);
        return Math.max(0, geometry.freeBytes - used);
      },
      close: once(async () => {
        try {
          if (mode === 'rw') await writeBackFat(ctx, part, dir, before);
        } finally {
          await rm(dir, { recursive: true, force: true });
        }
      }),
    };
  },
};

/** Applies the difference between `before` and the tree now under `dir` to the FAT volume. */
async function writeBackFat(ctx: VolumeContext, part: Partition, dir: string, before: Snapshot): Promise<void> {
  const img = mtoolsImage(ctx, part);
  const after = await snapshot(dir);
  const removedDirs = [...before.dirs].filter((d) => !after.dirs.has(d));
  const removedFiles = [...before.files.keys()].filter((f) => !after.files.has(f) && !removedDirs.some((d) => f.startsWith(`${d}/`)));
  const newDirs = [...after.dirs].filter((d) => !before.dirs.has(d)).sort((a, b) => a.split('/').length - b.split('/').length);
  const changed = [...after.files].filter(([path, f]) => {
    const old = before.files.get(path);
    return !old || old.size !== f.size || old.ctimeNs !== f.ctimeNs;
  });
  // Deletions first, so their space is free for the copies.
  const outermost = removedDirs.filter((d) => !removedDirs.some((o) => o !== d && d.startsWith(`${o}/`)));
  if (outermost.length > 0) await run('mdeltree', ['-i', img, ...outermost.map(fatPath)], { env: MTOOLS_ENV });
  if (removedFiles.length > 0) await run('mdel', ['-i', img, ...removedFiles.map(fatPath)], { env: MTOOLS_ENV });
  if (newDirs.length > 0) await run('mmd', ['-D', 'o', '-i', img, ...newDirs.map(fatPath)], { env: MTOOLS_ENV });
  // One mcopy per target directory.
  const byDir = new Map<string, string[]>();
  for (const [path] of changed) {
    const slash = path.lastIndexOf('/');
    const parent = slash < 0 ? '' : path.slice(0, slash);
    byDir.set(parent, [...(byDir.get(parent) ?? []), join(dir, path)]);
  }
  for (const [parent, sources] of byDir) {
    await run('mcopy', ['-m', '-D', 'o', '-i', img, ...sources, `${fatPath(parent)}${parent ? '/' : ''}`], { env: MTOOLS_ENV });
  }
}

export const noneDriver: VolumeDriver = {
  fs: 'none',
  async format() {
    // An unformatted partition stays as the disk has it (zeros on a fresh image).
  },
  async open(_ctx, part) {
    throw new DevkitUsageError(`partition ${part.number} has no filesystem to open`, { partition: part.number });
  },
};

/** The drivers by filesystem; built here explicitly, not registered by import side effects. */
export const DRIVERS: Readonly<Record<FsKind, VolumeDriver>> = { ext4: ext4Driver, ntfs: ntfsDriver, fat: fatDriver, none: noneDriver };

export function openable(part: Partition): boolean {
  return part.fs !== 'none';
}

/** Opens a volume, runs `fn` on it and closes it, also when `fn` throws. */
export async function withVolume<T>(ctx: VolumeContext, part: Partition, mode: 'ro' | 'rw', fn: (vol: OpenVolume) => Promise<T>): Promise<T> {
  const vol = await DRIVERS[part.fs].open(ctx, part, mode);
  let result: T;
  try {
    result = await fn(vol);
  } catch (err) {
    await vol.close().catch(() => undefined);
    throw err;
  }
  await vol.close();
  return result;
}
