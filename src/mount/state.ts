/**
 * What is mounted, kept on disk so `imagekeep umount` and `imagekeep mounts` work from any
 * process, also after the server was killed. One JSON record per mount point, plus the
 * server's log, in the run directory: $IMAGEKEEP_RUN_DIR, else /run/imagekeep (tmpfs on
 * most systems, so a reboot — which also ends every FUSE mount — clears it). A record is
 * named by a hash of the mount point's absolute path, so two mounts never share one.
 *
 * A `--writable` mount's overlay file is not here (it may grow to the disk's size, and the
 * run directory is usually a small tmpfs) but in a directory of the user's choice, default
 * the system's temporary directory; the record names it so `umount` can remove it after a
 * server that was killed.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface MountRecord {
  /** Absolute mount point. */
  dir: string;
  /** The FUSE server's process id. */
  pid: number;
  /** The image whose point is mounted (absolute). */
  image: string;
  /** Capture time of the point, ISO-8601. */
  pointTime: string;
  /** Nested filesystem mounts (absolute), outermost last. */
  nested: string[];
  /** The server's log (stderr), where blocks failing their checksum are named. */
  log: string;
  /** A --writable mount's overlay file (absolute), removed at unmount; absent when read-only. */
  overlay?: string;
  started: string;
}

export function runDir(): string {
  return process.env.IMAGEKEEP_RUN_DIR ?? '/run/imagekeep';
}

function idOf(dir: string): string {
  return createHash('sha256').update(dir).digest('hex').slice(0, 16);
}

export function recordPath(dir: string): string {
  return join(runDir(), `mount-${idOf(dir)}.json`);
}

export function logPath(dir: string): string {
  return join(runDir(), `mount-${idOf(dir)}.log`);
}

/** A fresh name for the overlay file of a --writable mount on `dir`, in `parent`. */
export function newOverlayPath(dir: string, parent: string): string {
  return join(parent, `imagekeep-overlay-${idOf(dir)}-${randomBytes(4).toString('hex')}.img`);
}

export async function writeRecord(rec: MountRecord): Promise<void> {
  await mkdir(runDir(), { recursive: true });
  const path = recordPath(rec.dir);
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify(rec, null, 2)}\n`);
  await rename(tmp, path);
}

export async function readRecord(dir: string): Promise<MountRecord | null> {
  try {
    return JSON.parse(await readFile(recordPath(dir), 'utf8')) as MountRecord;
  } catch {
    return null;
  }
}

export async function removeRecord(dir: string): Promise<void> {
  await rm(recordPath(dir), { force: true });
}

export async function allRecords(): Promise<MountRecord[]> {
  const names = await readdir(runDir()).catch(() => [] as string[]);
  const out: MountRecord[] = [];
  for (const n of names.filter((n) => /^mount-[0-9a-f]{16}\.json$/.test(n)).sort()) {
    try {
      out.push(JSON.parse(await readFile(join(runDir(), n), 'utf8')) as MountRecord);
    } catch {
      // a record being replaced right now; the next listing shows it
    }
  }
  return out;
}
