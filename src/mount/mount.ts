/**
 * Mounting a point in time, start to end:
 *
 *   1. pick the image (given, or the newest point of a folder at or before a time);
 *   2. open it, which checks the headers, indexes and point-id links of the whole path —
 *      a broken chain fails here, before anything is mounted;
 *   3. serve it: in this process (--foreground), or in a detached child started with the
 *      same command plus the hidden --server flag; the caller waits until the mount shows
 *      in /proc/mounts (or the child dies, whose log then explains why);
 *   4. with --files, mount each NTFS / ext / FAT volume read-only on files/pN from a
 *      process that is not the server (ntfs-3g, fuse2fs and fusefat are their own
 *      processes; they read the partition files through the kernel, which our server answers);
 *   5. record the mount (state.ts) for `umount` and `mounts`.
 *
 * --writable puts a copy-on-write overlay (overlay.ts) between the point and the server, in
 * a temporary file the caller names (so it is recorded before the server starts) and that
 * goes at unmount. With --files, NTFS and ext volumes are then mounted read-write (their
 * changes land in the overlay too), falling back to read-only with a warning when the
 * driver refuses (a hibernated NTFS, say); FAT stays read-only, because fusefat's writing
 * is marked experimental.
 *
 * Unmounting goes the other way: nested mounts first (deepest first), then — once their
 * daemons have exited, since a read-write one flushes after its umount returns — ours; a
 * mount whose server was killed is detached lazily and its overlay file removed. Nothing
 * here turns errors into errno or exit codes: the FUSE adapter (server.ts) and the CLI do.
 */
import { execFile, spawn } from 'node:child_process';
import { open, readFile, readdir, rm, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { groupChains, listFolder, loadChain, type ChainFile } from '../chain/folder.js';
import { bestEndingAt } from '../chain/path.js';
import { openPoint } from '../chain/open.js';
import type { KeyRing } from '../chain/image/reader.js';
import { ImagekeepError, UsageError } from '../formats/errors.js';
import { CachedPoint } from './cache.js';
import { Overlay } from './overlay.js';
import { isMountPoint, procMounts, serve, type ServedDevice } from './server.js';
import { allRecords, logPath, readRecord, removeRecord, writeRecord, type MountRecord } from './state.js';
import { buildView, type View } from './view.js';

const execFileP = promisify(execFile);

export class MountError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('MOUNT_FAILED', message, details);
  }
}

/** The image holding the newest point of `folder` captured at or before `at` (ms since the epoch). */
export async function pickImage(folder: string, at: number, volume?: string): Promise<string> {
  const dir = resolve(folder);
  const st = await stat(dir).catch(() => null);
  if (!st?.isDirectory()) throw new UsageError(`${folder} is not a backup folder`);
  const { images } = await listFolder(dir);
  const volumes = [...new Set(images.map((i) => i.volume))].sort();
  if (volume === undefined) {
    if (volumes.length > 1) throw new UsageError(`${folder} holds volumes ${volumes.join(', ')}; choose one with --volume`);
  } else if (!volumes.includes(volume)) {
    throw new UsageError(`${folder} holds no images of volume ${volume}${volumes.length ? ` (it has ${volumes.join(', ')})` : ''}`);
  }
  let best: { file: ChainFile; chain: ChainFile[] } | undefined;
  for (const members of groupChains(images.filter((i) => volume === undefined || i.volume === volume)).values()) {
    const { files } = await loadChain(members);
    for (const f of files) {
      if (f.header.pointTime > at) continue;
      if (!best || f.header.pointTime > best.file.header.pointTime) best = { file: f, chain: files };
    }
  }
  if (!best) throw new UsageError(`${folder} holds no point at or before ${new Date(at).toISOString()}`);
  return (bestEndingAt(best.chain, best.file.last) ?? best.file).path;
}

export interface ServeImageOptions {
  image: string;
  dir: string;
  keyring: KeyRing;
  files: boolean;
  /** --writable: the overlay file to create (it must not exist); absent for read-only. */
  overlay?: string;
  /** Mount the volumes and write the mount record from this process (foreground mode). */
  owner: boolean;
  log: (line: string) => void;
  signal: AbortSignal;
}

/** Opens (checks) the point and builds its view; the caller closes `dev`. */
export async function openView(image: string, keyring: KeyRing, files: boolean): Promise<{ dev: CachedPoint; view: View; pointTime: Date; encrypted: boolean }> {
  const { point } = await openPoint(image, keyring);
  try {
    const dev = new CachedPoint(point);
    const view = await buildView(dev, point.top.header.sourceKind, files);
    return { dev, view, pointTime: new Date(point.top.header.pointTime), encrypted: point.top.header.encryption !== null };
  } catch (e) {
    await point.close();
    throw e;
  }
}

async function checkMountDir(dir: string): Promise<void> {
  const st = await stat(dir).catch(() => null);
  if (!st?.isDirectory()) throw new UsageError(`${dir} is not a directory; create it first`);
  if (await isMountPoint(dir)) throw new UsageError(`${dir} is already a mount point; imagekeep umount ${dir} first`);
}

/**
 * Serves the point until the mount goes away or `signal` aborts; then unmounts (nested
 * mounts first when this process made them) and closes the point.
 */
export async function serveImage(o: ServeImageOptions): Promise<void> {
  const dir = resolve(o.dir);
  await checkMountDir(dir);
  const { dev, view, pointTime, encrypted } = await openView(o.image, o.keyring, o.files);
  let overlay: Overlay | undefined;
  try {
    let served: ServedDevice = dev;
    if (o.overlay) served = overlay = await Overlay.create(dev, o.overlay, { encrypt: encrypted });
    const server = await serve({ dir, view, dev: served, time: pointTime, log: o.log });
    let nested: string[] = [];
    try {
      if (o.owner) {
        if (o.files) {
          const r = await mountVolumes(dir, view, !!overlay);
          nested = r.mounted;
          for (const f of r.failed) o.log(`files/${f.name} not mounted: ${f.error}`);
          for (const w of r.warnings) o.log(w);
        }
        await writeRecord({ dir, pid: process.pid, image: resolve(o.image), pointTime: pointTime.toISOString(), nested, log: '', overlay: o.overlay, started: new Date().toISOString() });
      }
      await Promise.race([server.gone, new Promise((r) => o.signal.addEventListener('abort', r, { once: true }))]);
    } finally {
      for (const n of [...nested].reverse()) await detach(n, 'umount');
      await daemonsGone(nested);
      await server.unmount();
      if (o.owner) await removeRecord(dir);
    }
  } finally {
    if (overlay) {
      o.log(`overlay ${overlay.path} discarded (${overlay.bytesHeld} bytes written)`);
      await overlay.close();
    }
    await dev.close();
  }
}

export interface BackgroundOptions {
  image: string;
  dir: string;
  /** The command that serves in the foreground: [node, script, ...args]. */
  command: string[];
  files: boolean;
  /** --writable: the overlay file the server creates (given in `command` too); absent for read-only. */
  overlay?: string;
  /** Mount the volumes on files/pN once served (default: `files`); test-restore checks them first. */
  mountFiles?: boolean;
  keyring: KeyRing;
  timeoutMs?: number;
}

export interface MountResult {
  dir: string;
  image: string;
  pid: number;
  pointTime: string;
  view: View;
  nested: string[];
  failed: { name: string; error: string }[];
  /** Volumes mounted read-only although the mount is writable, and why. */
  warnings: string[];
  overlay?: string;
  log: string;
}

/** Checks the point, starts a detached server, waits for the mount, mounts the volumes, records it. */
export async function mountBackground(o: BackgroundOptions): Promise<MountResult> {
  const dir = resolve(o.dir);
  await checkMountDir(dir);
  // Check the whole path here, so a broken chain is this command's error, not a log line.
  const { dev, view, pointTime } = await openView(o.image, o.keyring, o.files);
  await dev.close();
  if (o.overlay) {
    const parent = dirname(resolve(o.overlay));
    if (!(await stat(parent).catch(() => null))?.isDirectory()) throw new UsageError(`${parent} (for the overlay of --writable) is not a directory`);
  }
  const log = logPath(dir);
  const overlay = o.overlay && resolve(o.overlay);
  await writeRecord({ dir, pid: 0, image: resolve(o.image), pointTime: pointTime.toISOString(), nested: [], log, overlay, started: new Date().toISOString() });
  const out = await open(log, 'w');
  let child;
  try {
    child = spawn(o.command[0]!, o.command.slice(1), { detached: true, stdio: ['ignore', out.fd, out.fd] });
  } finally {
    await out.close();
  }
  let exited: number | string | null | undefined;
  child.on('exit', (code, sig) => (exited = code ?? sig));
  child.on('error', (e) => (exited = e.message));
  const deadline = Date.now() + (o.timeoutMs ?? 60_000);
  while (!(await isMountPoint(dir))) {
    if (exited !== undefined || Date.now() > deadline) {
      if (exited === undefined) child.kill('SIGKILL');
      const text = (await readFile(log, 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' | ');
      await removeRecord(dir);
      if (overlay) await rm(overlay, { force: true });
      throw new MountError(`the mount server for ${dir} ${exited === undefined ? 'did not mount in time' : `exited (${exited})`}: ${text || 'no output'}`);
    }
    await sleep(20);
  }
  child.unref();
  const pid = child.pid!;
  let nested: string[] = [];
  let failed: MountResult['failed'] = [];
  let warnings: string[] = [];
  if (o.files && (o.mountFiles ?? true)) ({ mounted: nested, failed, warnings } = await mountVolumes(dir, view, !!overlay));
  await writeRecord({ dir, pid, image: resolve(o.image), pointTime: pointTime.toISOString(), nested, log, overlay, started: new Date().toISOString() });
  return { dir, image: resolve(o.image), pid, pointTime: pointTime.toISOString(), view, nested, failed, warnings, overlay, log };
}

/** The command mounting a volume of `fs` from `file` on `target`, read-only or read-write; null when none can. */
function volumeCommand(fs: string, file: string, target: string, rw: boolean): [string, string[]] | null {
  const mode = rw ? 'rw' : 'ro';
  if (fs === 'ntfs') return ['ntfs-3g', ['-o', mode, file, target]];
  if (fs === 'ext') return ['fuse2fs', ['-o', mode, file, target]];
  // fusefat writes only with its experimental "rw+": FAT is always mounted read-only.
  if (fs === 'fat' && !rw) return ['fusefat', ['-o', 'ro', file, target]];
  return null;
}

async function mountOne(cmd: [string, string[]], target: string): Promise<void> {
  await execFileP(cmd[0], cmd[1], { timeout: 120_000 });
  if (!(await isMountPoint(target))) throw new Error(`${cmd[0]} returned but ${target} is not mounted`);
}

const toolError = (tool: string, e: unknown): string => {
  const err = e as { stderr?: string; message?: string };
  return `${tool}: ${(err.stderr || err.message || String(e)).trim().split('\n').slice(-2).join(' | ')}`;
};

/**
 * Each NTFS, ext and FAT volume on files/pN: ntfs-3g, fuse2fs and fusefat on the volume's
 * partition file. Read-only, or with `writable` NTFS and ext read-write (a driver that
 * refuses is retried read-only, with a warning); FAT always read-only.
 */
export async function mountVolumes(dir: string, view: View, writable = false): Promise<{ mounted: string[]; failed: { name: string; error: string }[]; warnings: string[] }> {
  const mounted: string[] = [];
  const failed: { name: string; error: string }[] = [];
  const warnings: string[] = [];
  await Promise.all(view.volumes.map(async (v) => {
    const file = `${dir}${v.file.path}`;
    const target = `${dir}/files/${v.name}`;
    const ro = volumeCommand(v.fs, file, target, false);
    if (!ro) return;
    const rw = writable ? volumeCommand(v.fs, file, target, true) : null;
    if (rw) {
      try {
        await mountOne(rw, target);
        mounted.push(target);
        return;
      } catch (e) {
        warnings.push(`files/${v.name} mounted read-only: ${toolError(rw[0], e)}`);
      }
    } else if (writable) warnings.push(`files/${v.name} (${v.version ?? v.fs}) mounted read-only: fusefat writes only in an experimental mode`);
    try {
      await mountOne(ro, target);
      mounted.push(target);
    } catch (e) {
      failed.push({ name: v.name, error: toolError(ro[0], e) });
    }
  }));
  mounted.sort();
  return { mounted, failed, warnings };
}

/** Waits (up to 10 s) until no process runs with one of `mountPoints` as an argument: a FUSE daemon flushes after umount returns. */
async function daemonsGone(mountPoints: string[]): Promise<void> {
  if (mountPoints.length === 0) return;
  const wanted = new Set(mountPoints);
  for (let i = 0; i < 200; i++) {
    let found = false;
    for (const pid of await readdir('/proc').catch(() => [] as string[])) {
      if (!/^\d+$/.test(pid)) continue;
      const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
      if (cmdline.split('\0').some((arg) => wanted.has(arg)) && (await alive(Number(pid)))) {
        found = true;
        break;
      }
    }
    if (!found) return;
    await sleep(50);
  }
}

/** Unmounts `where`; busy or dead, it is detached lazily so nothing stays stuck. */
async function detach(where: string, tool: 'umount' | 'fusermount'): Promise<void> {
  const lazy = tool === 'umount' ? ['umount', ['-l', where]] as const : ['fusermount', ['-uz', where]] as const;
  for (let attempt = 0; attempt < 20 && (await isMountPoint(where)); attempt++) {
    try {
      if (tool === 'umount') await execFileP('umount', [where]);
      else await execFileP('fusermount', ['-u', where]);
    } catch {
      await sleep(100);
    }
  }
  if (await isMountPoint(where)) await execFileP(lazy[0], [...lazy[1]]).catch(() => undefined);
}

/** Is `pid` running? A killed server whose parent exited may linger as a zombie nobody reaps: that is not running. */
async function alive(pid: number): Promise<boolean> {
  if (pid <= 0) return false;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  if (stat === null) return false;
  return !/^\d+ \(.*\) [ZX]/s.test(stat);
}

/** Removes nested mounts, then ours, waits for the server to end; works on a dead server's mount. */
export async function unmount(dirArg: string): Promise<{ dir: string; unmounted: string[] }> {
  const dir = resolve(dirArg);
  const rec = await readRecord(dir);
  const mounts = await procMounts();
  const ours = mounts.some((m) => m.where === dir);
  if (!rec && !ours) throw new UsageError(`${dirArg} is not mounted by imagekeep (imagekeep mounts lists what is)`);
  if (!rec && ours && !mounts.some((m) => m.where === dir && m.type === 'fuse.imagekeep')) {
    throw new UsageError(`${dirArg} is mounted, but not by imagekeep; use umount`);
  }
  const unmounted: string[] = [];
  const nested = mounts.filter((m) => m.where.startsWith(`${dir}/`)).map((m) => m.where).sort((a, b) => b.length - a.length);
  for (const n of nested) {
    await detach(n, 'umount');
    unmounted.push(n);
  }
  // A read-write nested daemon still writes through our server after its umount returns.
  if (rec && (await alive(rec.pid))) await daemonsGone(nested);
  if (ours) {
    await detach(dir, 'fusermount');
    unmounted.push(dir);
  }
  if (rec && (await alive(rec.pid))) {
    // The server notices within a second that its mount is gone and exits.
    for (let i = 0; i < 100 && (await alive(rec.pid)); i++) await sleep(50);
    if (await alive(rec.pid)) process.kill(rec.pid, 'SIGTERM');
  }
  if (await isMountPoint(dir)) throw new MountError(`${dir} is still mounted after fusermount -uz; a process may hold it open`);
  await removeRecord(dir);
  if (rec?.log) await rm(rec.log, { force: true });
  // The server removes its overlay when it ends well; after a kill, this is what does.
  if (rec?.overlay) await rm(rec.overlay, { force: true });
  return { dir, unmounted };
}

export interface MountListing extends MountRecord {
  state: 'mounted' | 'server gone' | 'not mounted';
}

/** Our recorded mounts, with whether each is still mounted and served. */
export async function listMounts(): Promise<MountListing[]> {
  const mounts = await procMounts();
  const out: MountListing[] = [];
  for (const r of await allRecords()) {
    const mounted = mounts.some((m) => m.where === r.dir);
    out.push({ ...r, state: !mounted ? 'not mounted' : (await alive(r.pid)) ? 'mounted' : 'server gone' });
  }
  return out;
}
