/**
 * The folder lock shared by backup and process: a file created with O_EXCL holding the
 * owner's pid. A lock whose pid is gone (the owner was killed) is taken over, so a crash
 * never leaves a folder locked. Hand-written because the npm lock packages judge
 * staleness by age, which would keep a folder locked for seconds after every crash.
 */
import { open, readFile, readdir, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { RefusedError } from '../formats/errors.js';
import { TEMP_PREFIX } from './durable.js';

const LOCK_NAME = '.imagekeep.lock';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class FolderLock {
  private constructor(readonly path: string) {}

  static async acquire(dir: string, what: string): Promise<FolderLock> {
    const path = join(dir, LOCK_NAME);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const h = await open(path, 'wx');
        await h.writeFile(`${process.pid} ${hostname()} ${what}\n`);
        await h.close();
        await removeStaleTemps(dir);
        return new FolderLock(path);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        const [pidText, host, ...rest] = (await readFile(path, 'utf8').catch(() => '')).trim().split(' ');
        const pid = Number(pidText);
        if (host === hostname() && pid > 0 && !alive(pid)) {
          await unlink(path).catch(() => {});
          continue;
        }
        throw new RefusedError('FOLDER_LOCKED', `${dir} is in use by another imagekeep (pid ${pidText} on ${host}: ${rest.join(' ')}); wait for it to finish`);
      }
    }
    throw new RefusedError('FOLDER_LOCKED', `could not lock ${dir}`);
  }

  async release(): Promise<void> {
    await unlink(this.path).catch(() => {});
  }
}

/** Temporary files left by a killed writer; only called while holding the lock. */
async function removeStaleTemps(dir: string): Promise<void> {
  for (const name of await readdir(dir)) {
    if (name.startsWith(TEMP_PREFIX)) await unlink(join(dir, name)).catch(() => {});
  }
}
