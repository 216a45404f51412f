/**
 * test-restore: proves a point can be restored by checking every volume as the tools that
 * would use it see it. The point is mounted (a background server, so this process may
 * read the mount), then per volume:
 *
 *   ext2/3/4  e2fsck -fn on partitions/pN.raw, then a fuse2fs mount and a walk reading every file
 *   NTFS      ntfsfix -n (which passes almost anything), then an ntfs-3g mount and the walk
 *   FAT       fsck.vfat -n, then a fusefat mount and the walk
 *
 * The checkers run before the nested mounts: e2fsck refuses to go on with a filesystem it
 * sees mounted. A volume fails on a checker's non-zero exit, a mount that fails, or a file
 * that cannot be read (a block failing its checksum reads as EIO, never as wrong bytes).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, opendir, rmdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mountBackground, mountVolumes, unmount } from './mount.js';
import type { KeyRing } from '../chain/image/reader.js';

export interface CheckResult {
  tool: string;
  ok: boolean;
  detail: string;
}

export interface VolumeReport {
  name: string;
  fs: string;
  offset: number;
  length: number;
  ok: boolean;
  checks: CheckResult[];
  files?: number;
  bytes?: number;
}

export interface TestRestoreReport {
  image: string;
  pointTime: string;
  ok: boolean;
  volumes: VolumeReport[];
  seconds: number;
}

function tool(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 * 2 ** 20, timeout: 30 * 60_000 }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string }) | null;
      const code = e ? (typeof e.code === 'number' ? e.code : 127) : 0;
      resolve({ code, out: `${stdout}${stderr}${e && typeof e.code !== 'number' ? e.message : ''}` });
    });
  });
}

const lastLines = (text: string): string => text.trim().split('\n').filter((l) => l.trim()).slice(-3).join(' | ');

/** Reads every regular file under `root`, asynchronously (never block the reader of a FUSE mount). */
async function walk(root: string): Promise<{ files: number; bytes: number; errors: string[] }> {
  const r = { files: 0, bytes: 0, errors: [] as string[] };
  const buf = Buffer.allocUnsafe(1024 * 1024);
  const visit = async (dir: string): Promise<void> => {
    let d;
    try {
      d = await opendir(dir);
    } catch (e) {
      r.errors.push(`${dir}: ${(e as Error).message}`);
      return;
    }
    for await (const ent of d) {
      const p = join(dir, ent.name);
      if (ent.isDirectory()) await visit(p);
      else if (ent.isFile()) {
        try {
          const h = await open(p, 'r');
          try {
            for (;;) {
              const { bytesRead } = await h.read(buf, 0, buf.length, null);
              if (bytesRead === 0) break;
              r.bytes += bytesRead;
            }
          } finally {
            await h.close();
          }
          r.files++;
        } catch (e) {
          r.errors.push(`${p}: ${(e as Error).message}`);
        }
      }
    }
  };
  await visit(root);
  return r;
}

export async function testRestore(image: string, keyring: KeyRing, command: (image: string, dir: string) => string[]): Promise<TestRestoreReport> {
  const started = Date.now();
  const dir = await mkdtemp(join(tmpdir(), 'imagekeep-test-restore-'));
  const m = await mountBackground({ image, dir, command: command(image, dir), files: true, mountFiles: false, keyring }).catch(async (e) => {
    await rmdir(dir).catch(() => undefined);
    throw e;
  });
  const volumes: VolumeReport[] = [];
  try {
    for (const v of m.view.volumes) {
      const file = `${dir}${v.file.path}`;
      const checks: CheckResult[] = [];
      const check = async (name: string, cmd: string, args: string[]): Promise<void> => {
        const r = await tool(cmd, args);
        checks.push({ tool: name, ok: r.code === 0, detail: r.code === 0 ? 'clean' : `exit ${r.code}: ${lastLines(r.out)}` });
      };
      if (v.fs === 'ext') await check('e2fsck -fn', 'e2fsck', ['-fn', file]);
      else if (v.fs === 'ntfs') await check('ntfsfix -n', 'ntfsfix', ['-n', file]);
      else if (v.fs === 'fat') await check('fsck.vfat -n', 'fsck.vfat', ['-n', file]);
      volumes.push({ name: v.name, fs: v.fs, offset: v.file.offset, length: v.file.length, ok: true, checks });
    }
    const nested = await mountVolumes(dir, m.view);
    const mounter: Record<string, string> = { ntfs: 'ntfs-3g', ext: 'fuse2fs', fat: 'fusefat' };
    for (const rep of volumes) {
      if (!mounter[rep.fs]) continue;
      const label = `${mounter[rep.fs]} -o ro + read every file`;
      const fail = nested.failed.find((f) => f.name === rep.name);
      if (fail) {
        rep.checks.push({ tool: label, ok: false, detail: fail.error });
        continue;
      }
      const w = await walk(`${dir}/files/${rep.name}`);
      rep.files = w.files;
      rep.bytes = w.bytes;
      rep.checks.push({ tool: label, ok: w.errors.length === 0, detail: w.errors.length === 0 ? `${w.files} files, ${w.bytes} bytes read` : `${w.errors.length} unreadable: ${w.errors.slice(0, 3).join('; ')}` });
    }
    for (const rep of volumes) {
      if (rep.fs === 'unknown') rep.checks.push({ tool: '-', ok: true, detail: 'no NTFS, ext or FAT filesystem found; not checked' });
      rep.ok = rep.checks.every((c) => c.ok);
    }
  } finally {
    await unmount(dir).catch(() => undefined);
    await rmdir(dir).catch(() => undefined);
  }
  return { image: m.image, pointTime: m.pointTime, ok: volumes.every((v) => v.ok), volumes, seconds: (Date.now() - started) / 1000 };
}
