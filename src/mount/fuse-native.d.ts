/**
 * The part of fuse-native 2.2 (which ships no types) that the mount server uses. Callbacks
 * take a status first: 0 or a negative errno; `read` answers with the byte count instead.
 */
declare module 'fuse-native' {
  export interface FuseStat {
    mode: number;
    size: number;
    uid?: number;
    gid?: number;
    nlink?: number;
    ino?: number;
    blksize?: number;
    blocks?: number;
    atime: Date;
    mtime: Date;
    ctime: Date;
  }

  export interface FuseStatfs {
    bsize: number; frsize: number; blocks: number; bfree: number; bavail: number;
    files: number; ffree: number; favail: number; fsid: number; flag: number; namemax: number;
  }

  export interface FuseOps {
    init?(cb: (status: number) => void): void;
    statfs?(path: string, cb: (status: number, st?: FuseStatfs) => void): void;
    getattr?(path: string, cb: (status: number, st?: FuseStat) => void): void;
    readdir?(path: string, cb: (status: number, names?: string[], stats?: FuseStat[]) => void): void;
    open?(path: string, flags: number, cb: (status: number, fd?: number) => void): void;
    release?(path: string, fd: number, cb: (status: number) => void): void;
    read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrStatus: number) => void): void;
    write?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrStatus: number) => void): void;
    truncate?(path: string, size: number, cb: (status: number) => void): void;
    ftruncate?(path: string, fd: number, size: number, cb: (status: number) => void): void;
    flush?(path: string, fd: number, cb: (status: number) => void): void;
    fsync?(path: string, fd: number, datasync: boolean, cb: (status: number) => void): void;
    utimens?(path: string, atime: Date, mtime: Date, cb: (status: number) => void): void;
    create?(path: string, mode: number, cb: (status: number, fd?: number) => void): void;
    mkdir?(path: string, mode: number, cb: (status: number) => void): void;
    unlink?(path: string, cb: (status: number) => void): void;
    rmdir?(path: string, cb: (status: number) => void): void;
    rename?(src: string, dest: string, cb: (status: number) => void): void;
  }

  export interface FuseOptions {
    /** Per-operation timeout in ms (default 15000), or false for none. */
    timeout?: number | false;
    force?: boolean;
    mkdir?: boolean;
    debug?: boolean;
    allowOther?: boolean;
    fsname?: string;
    subtype?: string;
    maxRead?: number;
    kernelCache?: boolean;
    autoCache?: boolean;
    attrTimeout?: number;
    entryTimeout?: number;
  }

  export default class Fuse {
    constructor(mnt: string, ops: FuseOps, opts?: FuseOptions);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    /** The "-o a,b,c" string given to libfuse, built from the options at mount time (internal, but the only way to add options it has no setting for). */
    _fuseOptions(): string;
    unmount(cb: (err: Error | null) => void): void;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly EPERM: number;
    static readonly ENOENT: number;
    static readonly EIO: number;
    static readonly EBADF: number;
    static readonly EACCES: number;
    static readonly EISDIR: number;
    static readonly EINVAL: number;
    static readonly EROFS: number;
    static readonly ENOSPC: number;
    static readonly ENOTDIR: number;
  }
}
