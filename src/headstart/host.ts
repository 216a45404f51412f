/**
 * Where a standby disk lives: this machine, or a hypervisor host reached over SSH. A job
 * touches its host only through this interface, so seeding, applying, the state file and
 * VM registration are the same code for a local folder and for `ssh://user@host/dir`.
 *
 * Every write, fsync, rename and unlink is a durable step (the fault-injection switch), on
 * either kind of host. Commands take an argv, never a shell string: on an SSH host each word
 * is quoted for the remote POSIX shell, so a path with spaces or quotes stays one word.
 */
import { execFile } from 'node:child_process';
import { mkdir, readFile, rename, stat, unlink } from 'node:fs/promises';
import { dirname, posix } from 'node:path';
import type { FileOpener } from '../formats/disk-image.js';
import { DurableFile, durableStep } from '../formats/durable.js';
import { LocalFile } from '../formats/local-file.js';
import type { RandomAccessFile } from '../formats/types.js';
import { SshConnection, type ExecResult, type SshConnectOptions } from '../formats/ssh/connection.js';
import { isNoSuchFile, remoteRename, remoteStat, remoteUnlink } from '../formats/ssh/opener.js';
import { syncDir } from '../chain/durable.js';
import { ImagekeepError } from '../formats/errors.js';

export type { ExecResult };

export interface HostFileInfo {
  size: number;
  mtimeMs: number;
}

export interface Host {
  /** `local` or `user@host:port`: how messages name the host. */
  readonly label: string;
  readonly remote: boolean;
  /** Opens a file by absolute path; writes and flushes are durable steps. */
  open(path: string, mode: 'r' | 'r+' | 'w' | 'wx'): Promise<RandomAccessFile>;
  /** A FileOpener for a disk's siblings (VMDK extents) in folder `dir`. */
  opener(dir: string): FileOpener;
  stat(path: string): Promise<HostFileInfo | null>;
  /** The whole file, or null when there is none. */
  readFile(path: string): Promise<Buffer | null>;
  /** Writes `data` to `path.tmp`, flushes it, renames it over `path`: readers see old or new, never half. */
  writeFileAtomic(path: string, data: string | Uint8Array): Promise<void>;
  /** Atomic rename that replaces `to`. */
  rename(from: string, to: string): Promise<void>;
  unlink(path: string, options?: { missingOk?: boolean }): Promise<void>;
  mkdirp(path: string): Promise<void>;
  /** Runs argv[0] with arguments argv[1..] on the host. Never throws for a non-zero exit; read `code`. */
  run(argv: string[], options?: { input?: string }): Promise<ExecResult>;
  close(): Promise<void>;
}

/** Quotes one word for a POSIX shell. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

export class LocalHost implements Host {
  readonly label = 'local';
  readonly remote = false;

  async open(path: string, mode: 'r' | 'r+' | 'w' | 'wx'): Promise<RandomAccessFile> {
    const file = await LocalFile.open(path, mode);
    return mode === 'r' ? file : new DurableFile(file);
  }

  opener(dir: string): FileOpener {
    return (name, mode) => this.open(posix.isAbsolute(name) ? name : posix.join(dir, name), mode);
  }

  async stat(path: string): Promise<HostFileInfo | null> {
    try {
      const st = await stat(path);
      return { size: st.size, mtimeMs: st.mtimeMs };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }

  async readFile(path: string): Promise<Buffer | null> {
    try {
      return await readFile(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }

  async writeFileAtomic(path: string, data: string | Uint8Array): Promise<void> {
    await writeThroughTemp(this, path, data);
    await syncDir(dirname(path));
  }

  async rename(from: string, to: string): Promise<void> {
    durableStep(`rename ${from} -> ${to}`);
    await rename(from, to);
  }

  async unlink(path: string, options: { missingOk?: boolean } = {}): Promise<void> {
    durableStep(`unlink ${path}`);
    try {
      await unlink(path);
    } catch (e) {
      if (options.missingOk && (e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
  }

  async mkdirp(path: string): Promise<void> {
    await mkdir(path, { recursive: true });
  }

  run(argv: string[], options: { input?: string } = {}): Promise<ExecResult> {
    return new Promise((resolve) => {
      const child = execFile(argv[0]!, argv.slice(1), { maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: number | string; signal?: string }) | null;
        if (e && typeof e.code === 'string') {
          // The program could not be started at all (ENOENT): say so as a shell would.
          resolve({ code: 127, stdout: '', stderr: `${argv[0]}: ${e.message}\n` });
          return;
        }
        const result: ExecResult = { code: e ? (typeof e.code === 'number' ? e.code : null) : 0, stdout, stderr };
        if (e?.signal) result.signal = e.signal;
        resolve(result);
      });
      child.stdin?.end(options.input);
    });
  }

  async close(): Promise<void> {}
}

export class SshHost implements Host {
  readonly remote = true;

  private constructor(readonly conn: SshConnection) {}

  static async connect(options: SshConnectOptions): Promise<SshHost> {
    return new SshHost(await SshConnection.connect(options));
  }

  get label(): string {
    return this.conn.label;
  }

  async open(path: string, mode: 'r' | 'r+' | 'w' | 'wx'): Promise<RandomAccessFile> {
    const file = await this.conn.openFile(path, mode);
    return mode === 'r' ? file : new DurableFile(file);
  }

  opener(dir: string): FileOpener {
    return (name, mode) => this.open(posix.isAbsolute(name) ? name : posix.join(dir, name), mode);
  }

  async stat(path: string): Promise<HostFileInfo | null> {
    const st = await remoteStat(this.conn, path);
    return st ? { size: st.size, mtimeMs: st.mtime * 1000 } : null;
  }

  async readFile(path: string): Promise<Buffer | null> {
    let file: RandomAccessFile;
    try {
      file = await this.conn.openFile(path, 'r');
    } catch (e) {
      if (isNoSuchFile(e)) return null;
      throw e;
    }
    try {
      const bytes = Buffer.alloc(await file.size());
      if (bytes.length > 0) await file.read(bytes, 0);
      return bytes;
    } finally {
      await file.close();
    }
  }

  /** SFTP cannot fsync a folder: the rename is durable at the host's next journal commit. */
  async writeFileAtomic(path: string, data: string | Uint8Array): Promise<void> {
    await writeThroughTemp(this, path, data);
  }

  async rename(from: string, to: string): Promise<void> {
    durableStep(`rename ${from} -> ${to}`);
    await remoteRename(this.conn, from, to);
  }

  async unlink(path: string, options: { missingOk?: boolean } = {}): Promise<void> {
    durableStep(`unlink ${path}`);
    await remoteUnlink(this.conn, path, options);
  }

  async mkdirp(path: string): Promise<void> {
    const r = await this.run(['mkdir', '-p', path]);
    if (r.code !== 0) throw new Error(`${this.label}: cannot create ${path}: ${r.stderr.trim() || `exit ${r.code}`}`);
  }

  run(argv: string[], options: { input?: string } = {}): Promise<ExecResult> {
    return this.conn.exec(argv.map(shellQuote).join(' '), options);
  }

  async close(): Promise<void> {
    await this.conn.close();
  }
}

/** Writes `path.tmp` completely, flushes it, renames it over `path`. */
async function writeThroughTemp(host: Host, path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.tmp`;
  const file = await host.open(tmp, 'w');
  try {
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    if (bytes.length > 0) await file.write(bytes, 0);
    await file.flush();
  } finally {
    await file.close();
  }
  await host.rename(tmp, path);
}

/** Runs a command and throws one line naming the host and the command's complaint when it fails. */
export async function runChecked(host: Host, argv: string[], options: { input?: string } = {}): Promise<string> {
  const r = await host.run(argv, options);
  if (r.code !== 0) {
    const why = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-1)[0] || `exit ${r.code ?? r.signal}`;
    throw new HostCommandError(`${host.label}: ${argv[0]} failed: ${why}`, { host: host.label, argv, code: r.code, stderr: r.stderr });
  }
  return r.stdout;
}

export class HostCommandError extends ImagekeepError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('HOST_COMMAND', message, details);
  }
}
