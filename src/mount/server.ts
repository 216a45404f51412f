/**
 * The FUSE adapter: serves a `View` of a cached point through fuse-native. It is the only
 * place where errors become errno values: a block that fails its checksum answers EIO
 * for the read that needed it (never bytes) and is logged with image and block; anything
 * else unexpected is EIO too, and logged.
 *
 * Read-only (the default), the mount is `ro` and the kernel keeps pages across opens: the
 * bytes never change. Over a device that can be written (the `--writable` overlay), files
 * open for writing and the mount uses direct_io: disk.raw and partitions/pN.raw are
 * different files over the same bytes, so a page cached for one would go stale when the
 * other is written; with direct_io every read reaches the overlay. big_writes lets a
 * write arrive as up to 128 KiB instead of one 4 KiB page per request. A file keeps its
 * size: a write starting at or past its end fails with ENOSPC (as a block device's does),
 * one crossing it is cut short there, and truncate to another size is EPERM, as are
 * creating, removing and renaming entries: the tree is fixed.
 *
 * Never read the mount from this process synchronously: the event loop that would block
 * is the one that answers the kernel. Nested mounts (ntfs-3g, fuse2fs) are separate
 * processes, so starting them asynchronously from here is safe.
 */
import Fuse, { type FuseOps, type FuseOptions, type FuseStat } from 'fuse-native';
import { readFile } from 'node:fs/promises';
import { CorruptImageError } from '../formats/errors.js';
import { listDir, type View, type ViewFile } from './view.js';

export type LogLine = (line: string) => void;

export interface Server {
  readonly dir: string;
  /** Resolves when the mount is gone (unmounted by us or from outside). */
  readonly gone: Promise<void>;
  unmount(): Promise<void>;
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

/** What the server reads (and, when `write` is there, writes): a point, or an overlay over one. */
export interface ServedDevice {
  readonly size: number;
  read(into: Uint8Array, at: number): Promise<void>;
  write?(from: Uint8Array, at: number): Promise<void>;
}

/** The errno for an error thrown while answering a request (negative, as libfuse wants). */
export function errnoOf(e: unknown): number {
  if (e instanceof RangeError) return Fuse.EINVAL;
  // The overlay's temporary disk filled up.
  if ((e as NodeJS.ErrnoException)?.code === 'ENOSPC') return Fuse.ENOSPC;
  return Fuse.EIO;
}

/** fuse-native with mount options it has no setting for (ro, direct_io, big_writes). */
class MountFuse extends Fuse {
  constructor(mnt: string, ops: FuseOps, opts: FuseOptions, private readonly extra: string[]) {
    super(mnt, ops, opts);
  }

  override _fuseOptions(): string {
    const base = super._fuseOptions();
    if (this.extra.length === 0) return base;
    return base ? `${base},${this.extra.join(',')}` : `-o${this.extra.join(',')}`;
  }
}

export interface ServeOptions {
  dir: string;
  view: View;
  dev: ServedDevice;
  /** Times shown on every entry (the point's capture time). */
  time: Date;
  log: LogLine;
  /** Seconds between checks that the mount still exists (default 1). */
  pollSeconds?: number;
}

export async function serve(opts: ServeOptions): Promise<Server> {
  const { view, dev, log } = opts;
  const write = dev.write?.bind(dev);
  const fileMode = write ? 0o644 : 0o444;
  const files = new Map<string, ViewFile>(view.files.map((f) => [f.path, f]));
  const dirs = new Set(view.dirs);
  const t = opts.time;
  const stat = (mode: number, size: number): FuseStat => ({ mode, size, nlink: 1, uid: 0, gid: 0, atime: t, mtime: t, ctime: t, blksize: 65536, blocks: Math.ceil(size / 512) });
  const statOf = (path: string): FuseStat | undefined => {
    if (dirs.has(path)) return stat(S_IFDIR | 0o555, 4096);
    const f = files.get(path);
    return f ? stat(S_IFREG | fileMode, f.length) : undefined;
  };
  const reported = new Set<string>();
  const failed = (what: string, path: string, pos: number, n: number, e: unknown): number => {
    if (e instanceof CorruptImageError) {
      if (!reported.has(e.message)) {
        reported.add(e.message);
        log(`EIO on ${path} bytes ${pos}..${pos + n}: ${e.message}`);
      }
    } else log(`${what} error on ${path} bytes ${pos}..${pos + n}: ${(e as Error)?.stack ?? String(e)}`);
    return errnoOf(e);
  };

  const ops: FuseOps = {
    getattr(path, cb) {
      const st = statOf(path);
      if (st) cb(0, st);
      else cb(Fuse.ENOENT);
    },
    readdir(path, cb) {
      if (!dirs.has(path)) return cb(Fuse.ENOENT);
      const names = listDir(view, path);
      cb(0, names, names.map((n) => statOf(path === '/' ? `/${n}` : `${path}/${n}`)!));
    },
    open(path, flags, cb) {
      if (dirs.has(path)) return cb(Fuse.EISDIR);
      if (!files.has(path)) return cb(Fuse.ENOENT);
      if ((flags & 3) !== 0 && !write) return cb(Fuse.EROFS); // O_WRONLY or O_RDWR
      cb(0, 0);
    },
    release(_path, _fd, cb) {
      cb(0);
    },
    statfs(_path, cb) {
      const blocks = Math.ceil(dev.size / 4096);
      cb(0, { bsize: 4096, frsize: 4096, blocks, bfree: 0, bavail: 0, files: files.size + dirs.size, ffree: 0, favail: 0, fsid: 0, flag: write ? 0 : 1, namemax: 255 });
    },
    read(path, _fd, buf, len, pos, cb) {
      const f = files.get(path);
      if (!f) return cb(Fuse.ENOENT);
      const n = Math.max(0, Math.min(len, f.length - pos));
      if (n === 0) return cb(0);
      dev.read(buf.subarray(0, n), f.offset + pos).then(() => cb(n), (e: unknown) => cb(failed('read', path, pos, n, e)));
    },
  };
  if (write) {
    Object.assign(ops, {
      write(path, _fd, buf, len, pos, cb) {
        const f = files.get(path);
        if (!f) return cb(Fuse.ENOENT);
        if (pos >= f.length) return cb(len === 0 ? 0 : Fuse.ENOSPC);
        const n = Math.min(len, f.length - pos);
        write(buf.subarray(0, n), f.offset + pos).then(() => cb(n), (e: unknown) => cb(failed('write', path, pos, n, e)));
      },
      truncate(path, size, cb) {
        const f = files.get(path);
        if (!f) return cb(dirs.has(path) ? Fuse.EISDIR : Fuse.ENOENT);
        cb(size === f.length ? 0 : Fuse.EPERM);
      },
      ftruncate(path, _fd, size, cb) {
        const f = files.get(path);
        cb(!f ? Fuse.ENOENT : size === f.length ? 0 : Fuse.EPERM);
      },
      // Nothing to make durable: the overlay is discarded at unmount.
      flush: (_path, _fd, cb) => cb(0),
      fsync: (_path, _fd, _datasync, cb) => cb(0),
      // Times stay the point's; accepting the call lets `touch` and `cp --preserve` succeed.
      utimens: (path, _atime, _mtime, cb) => cb(files.has(path) || dirs.has(path) ? 0 : Fuse.ENOENT),
      // The tree is fixed: only the bytes of its files can change.
      create: (_path, _mode, cb) => cb(Fuse.EPERM),
      mkdir: (_path, _mode, cb) => cb(Fuse.EPERM),
      unlink: (_path, cb) => cb(Fuse.EPERM),
      rmdir: (_path, cb) => cb(Fuse.EPERM),
      rename: (_src, _dest, cb) => cb(Fuse.EPERM),
    } satisfies FuseOps);
  }

  const fuse = new MountFuse(opts.dir, ops, {
    // A loaded machine may take seconds for one read; an expired timeout would answer EIO.
    timeout: 120_000,
    fsname: 'imagekeep',
    subtype: 'imagekeep',
    // Read-only data that never changes: let the kernel keep pages across opens.
    kernelCache: !write,
    attrTimeout: 3600,
    entryTimeout: 3600,
  }, write ? ['direct_io', 'big_writes'] : ['ro']);
  await new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(err) : resolve())));

  let stopped = false;
  let resolveGone!: () => void;
  const gone = new Promise<void>((r) => (resolveGone = r));
  // libfuse ends its loop when the mount goes away (fusermount -u from `imagekeep umount`),
  // but fuse-native does not tell us: look at /proc/mounts instead.
  const timer = setInterval(() => {
    void isMountPoint(opts.dir).then((mounted) => {
      if (!mounted && !stopped) {
        stopped = true;
        clearInterval(timer);
        resolveGone();
      }
    });
  }, (opts.pollSeconds ?? 1) * 1000);

  return {
    dir: opts.dir,
    gone,
    unmount: async () => {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      await new Promise<void>((resolve) => fuse.unmount(() => resolve()));
      resolveGone();
    },
  };
}

/** Mount points of /proc/mounts, octal escapes (\040 for a space) decoded. */
export async function procMounts(): Promise<{ what: string; where: string; type: string }[]> {
  const text = await readFile('/proc/mounts', 'utf8');
  const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return text.split('\n').filter((l) => l.length > 0).map((l) => {
    const [what = '', where = '', type = ''] = l.split(' ');
    return { what: unescape(what), where: unescape(where), type };
  });
}

export async function isMountPoint(dir: string): Promise<boolean> {
  return (await procMounts()).some((m) => m.where === dir);
}
