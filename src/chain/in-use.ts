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

export interface MountEntry {
  what: string;
  where: string;
  options: string[];
}

/** /proc/mounts entries whose source is `path` itself or, for a block device, one of its partitions. */
export async function mountsOf(path: string): Promise<MountEntry[]> {
  const real = await realpath(path);
  const found: MountEntry[] = [];
  for (const line of (await readFile('/proc/mounts', 'utf8').catch(() => '')).split('\n')) {
    const [what, where, , options] = line.split(' ');
    if (!what || !where) continue;
    const isPartition = real.startsWith('/dev/') && what.startsWith(real) && /^p?\d+$/.test(what.slice(real.length));
    if (what === path || what === real || isPartition || (await realpath(what).catch(() => '')) === real) {
      found.push({ what, where, options: (options ?? '').split(',') });
    }
  }
  return found;
}

export async function mountedUse(target: string): Promise<InUse | null> {
  const real = await realpath(target);
  const [mount] = await mountsOf(target);
  if (mount) return { by: mount.what === target || mount.what === real ? `mounted at ${mount.where}` : `${mount.what} mounted at ${mount.where}` };
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
