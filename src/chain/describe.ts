/**
 * What `ls` shows: every chain of a folder with its files, ranges, point times, sizes and
 * whether each has its .md5; files whose headers cannot be read are listed with the reason.
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { groupChains, listFolder, loadChain } from './folder.js';
import { levelName } from './names.js';
import { readSidecar } from './sidecar.js';
import { dependencyPath, newestFile } from './path.js';

export interface FileDescription {
  name: string;
  level: string;
  first: number;
  last: number;
  pointTime: string;
  bytes: number;
  md5: 'present' | 'missing' | 'unreadable';
  onNewestPath: boolean;
}

export interface ChainDescription {
  volume: string;
  base: number;
  chainId: string;
  virtualSize: number;
  blockSize: number;
  sourceKind: string;
  forensic: boolean;
  compression: string;
  encrypted: boolean;
  newest: string | null;
  files: FileDescription[];
  problems: { name: string; error: string }[];
}

export async function describeFolder(folder: string): Promise<{ folder: string; chains: ChainDescription[]; strays: string[] }> {
  const dir = resolve(folder);
  const { images, strays } = await listFolder(dir);
  const chains: ChainDescription[] = [];
  for (const [, members] of groupChains(images)) {
    const { files, unreadable } = await loadChain(members);
    const problems = unreadable.map((u) => ({ name: u.image.name, error: u.error.message }));
    const newest = newestFile(files);
    let onPath = new Set<string>();
    try {
      if (newest) onPath = new Set(dependencyPath(newest, files).map((f) => f.name));
    } catch (e) {
      problems.push({ name: newest!.name, error: (e as Error).message });
    }
    const ref = (newest ?? files[0])?.header;
    const described: FileDescription[] = [];
    for (const f of files.sort((a, b) => a.last - b.last || a.first - b.first || a.levelBits - b.levelBits)) {
      let md5: FileDescription['md5'] = 'present';
      try {
        if ((await readSidecar(f.path, f.name)) === null) md5 = 'missing';
      } catch {
        md5 = 'unreadable';
      }
      described.push({
        name: f.name, level: levelName(f.levelBits, f.last === 0), first: f.first, last: f.last,
        pointTime: new Date(f.header.pointTime).toISOString(), bytes: (await stat(f.path)).size, md5, onNewestPath: onPath.has(f.name),
      });
    }
    chains.push({
      volume: members[0]!.volume, base: members[0]!.base, chainId: ref ? ref.chainId.toString('hex') : '',
      virtualSize: ref?.virtualSize ?? 0, blockSize: ref?.blockSize ?? 0, sourceKind: ref?.sourceKind ?? '', forensic: ref?.forensic ?? false,
      compression: ref?.compression ?? '', encrypted: !!ref?.encryption, newest: newest?.name ?? null, files: described, problems,
    });
  }
  return { folder: dir, chains, strays };
}
