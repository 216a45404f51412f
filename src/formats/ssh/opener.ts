/**
 * The SFTP side of a disk's neighbourhood: a FileOpener that reaches sibling files (a VMDK's
 * `-flat.vmdk`, a parent disk) relative to a remote folder, and the few path operations the
 * temporary-name-then-rename pattern needs.
 *
 * Renames use posix-rename@openssh.com, i.e. rename(2) on the host: atomic, and it replaces
 * an existing target. Plain SFTP RENAME refuses an existing target on OpenSSH, and
 * unlink-then-rename would leave a moment with no file, so without the extension we refuse.
 * SFTP has no way to fsync a directory: flush the file before renaming it, and the rename
 * itself becomes durable at the host filesystem's next journal commit (ext4: 5 s by default).
 */
import { posix } from 'node:path';
import type { Stats } from 'ssh2';
import type { FileOpener } from '../disk-image.js';
import { SFTP_NO_SUCH_FILE, type SshConnection } from './connection.js';
import { SshError } from './errors.js';
import type { SftpFileOptions } from './sftp-file.js';

/** Opens files named relative to remote folder `dir` (absolute names as given). */
export function sftpOpener(conn: SshConnection, dir: string, options: SftpFileOptions = {}): FileOpener {
  return (name, mode) => conn.openFile(posix.isAbsolute(name) ? name : posix.join(dir, name), mode, options);
}

/** stat(2) of a remote path (symlinks followed), or null if nothing is there. */
export async function remoteStat(conn: SshConnection, path: string): Promise<Stats | null> {
  try {
    return await conn.call<Stats>(`stat ${path}`, (done) => conn.sftp.stat(path, done));
  } catch (e) {
    if (isNoSuchFile(e)) return null;
    throw e;
  }
}

export async function remoteExists(conn: SshConnection, path: string): Promise<boolean> {
  return (await remoteStat(conn, path)) !== null;
}

/** Atomically renames `from` to `to`, replacing `to` if it exists. */
export async function remoteRename(conn: SshConnection, from: string, to: string): Promise<void> {
  if (!conn.hasExtension('posix-rename@openssh.com')) {
    throw new SshError('SSH_IO',
      `${conn.label}: the SFTP server has no posix-rename@openssh.com, so ${from} cannot replace ${to} atomically; use an OpenSSH server`,
      { label: conn.label, from, to });
  }
  await conn.call<void>(`rename ${from} to ${to}`, (done) => conn.sftp.ext_openssh_rename(from, to, (err) => done(err, undefined)));
}

/** Removes a remote file; a missing file is an error unless `missingOk`. */
export async function remoteUnlink(conn: SshConnection, path: string, options: { missingOk?: boolean } = {}): Promise<void> {
  try {
    await conn.call<void>(`unlink ${path}`, (done) => conn.sftp.unlink(path, (err) => done(err, undefined)));
  } catch (e) {
    if (options.missingOk && isNoSuchFile(e)) return;
    throw e;
  }
}

/** Is this the SFTP "no such file" answer? */
export function isNoSuchFile(e: unknown): boolean {
  return e instanceof SshError && e.code === 'SSH_IO' && e.details.status === SFTP_NO_SUCH_FILE;
}
