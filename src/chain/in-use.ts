/**
 * Is a restore target in use by a mounted filesystem? A block device shows in /proc/mounts
 * by its path; a disk image file mounted through FUSE (fuse2fs, ntfs-3g) may show there by
 * a relative path, so we also look for a process that holds the file open while holding
 * /dev/fuse: that is a FUSE server serving a filesystem out of it.
 */
import { readFile, readdir, readlink, realpath } from 'node:fs/promises';

export interface InUse {
  by: string;
}

export async function mountedUse(target: string): Promise<InUse | null> {
  const real = await realpath(target);
  const mounts = await readFile('/proc/mounts', 'utf8').catch(() => '');
  for (const line of mounts.split('\n')) {
    const [what, where] = line.split(' ');
    if (what && (what === target || what === real || (await realpath(what).catch(() => '')) === real)) {
      return { by: `mounted at ${where}` };
    }
    // A partition of a whole-disk block device.
    if (what && real.startsWith('/dev/') && what.startsWith(real) && /^p?\d+$/.test(what.slice(real.length))) {
      return { by: `${what} mounted at ${where}` };
    }
  }
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    let holds = false;
    let fuse = false;
    try {
      for (const fd of await readdir(`/proc/${pid}/fd`)) {
        const link = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
        if (link === real) holds = true;
        else if (link === '/dev/fuse') fuse = true;
      }
    } catch {
      continue;
    }
    if (holds && fuse) {
      const comm = (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '?')).trim();
      return { by: `served as a filesystem by ${comm} (pid ${pid})` };
    }
  }
  return null;
}
