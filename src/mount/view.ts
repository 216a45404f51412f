/**
 * What a mounted point shows: a small fixed tree of read-only files, each a byte range of
 * the point. A disk image shows `disk.raw` and `partitions/pN.raw` (Linux numbering: MBR
 * primaries p1-p4 by slot, logicals from p5, GPT in table order; an MBR extended
 * container is not a volume and is left out); a volume image shows `volume.raw`. With
 * --files, `files/pN/` (or `files/volume/`) are empty directories the nested filesystem
 * mounts cover. Building the view reads the partition table and each volume's first
 * 8 KiB to name its filesystem; nothing else is read until a file is.
 */
import { isExtendedType, readPartitionTable } from '../formats/disk/partitions.js';
import { probeExt } from '../formats/fs/ext.js';
import { probeNtfs } from '../formats/fs/ntfs.js';
import type { BlockDevice } from '../formats/types.js';

export type VolumeFs = 'ntfs' | 'ext' | 'fat' | 'unknown';

export interface ViewFile {
  /** Path inside the mount, with a leading slash: "/disk.raw", "/partitions/p1.raw". */
  path: string;
  /** Byte range of the point. */
  offset: number;
  length: number;
}

export interface ViewVolume {
  /** "p1", "p5", or "volume" for a volume image. */
  name: string;
  /** The file holding it ("/partitions/p1.raw"). */
  file: ViewFile;
  fs: VolumeFs;
  /** Partition number, absent for a volume image. */
  number?: number;
}

export interface View {
  kind: 'disk' | 'volume';
  scheme: 'gpt' | 'mbr' | 'none' | 'volume';
  files: ViewFile[];
  volumes: ViewVolume[];
  /** Directories, with a leading slash; "/" included. */
  dirs: string[];
}

/** FAT12/16/32: a boot sector with 0x55AA and "FAT" where FAT16 or FAT32 keep their type string. */
export function probeFat(head: Uint8Array): boolean {
  if (head.length < 512 || head[510] !== 0x55 || head[511] !== 0xaa) return false;
  const text = (at: number): string => String.fromCharCode(...head.subarray(at, at + 8));
  return text(54).startsWith('FAT') || text(82).startsWith('FAT32');
}

export function probeFs(head: Uint8Array): VolumeFs {
  if (probeNtfs(head)) return 'ntfs';
  if (probeExt(head)) return 'ext';
  if (probeFat(head)) return 'fat';
  return 'unknown';
}

async function headOf(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(Math.min(8192, length));
  await dev.read(buf, offset);
  return buf;
}

export async function buildView(dev: BlockDevice, kind: 'disk' | 'volume', withFiles: boolean): Promise<View> {
  const dirs = ['/'];
  if (kind === 'volume') {
    const file = { path: '/volume.raw', offset: 0, length: dev.size };
    const fs = probeFs(await headOf(dev, 0, dev.size));
    const volumes = [{ name: 'volume', file, fs }];
    if (withFiles) dirs.push('/files', '/files/volume');
    return { kind, scheme: 'volume', files: [file], volumes, dirs };
  }
  const table = await readPartitionTable(dev);
  const files: ViewFile[] = [{ path: '/disk.raw', offset: 0, length: dev.size }];
  const volumes: ViewVolume[] = [];
  for (const p of table.partitions) {
    if (table.scheme === 'mbr' && isExtendedType(p.type)) continue;
    const file = { path: `/partitions/p${p.number}.raw`, offset: p.offset, length: p.length };
    files.push(file);
    volumes.push({ name: `p${p.number}`, number: p.number, file, fs: probeFs(await headOf(dev, p.offset, p.length)) });
  }
  if (volumes.length > 0) dirs.push('/partitions');
  if (withFiles) {
    dirs.push('/files');
    for (const v of volumes) if (v.fs !== 'unknown') dirs.push(`/files/${v.name}`);
  }
  return { kind, scheme: table.scheme, files, volumes, dirs };
}

/** The names directly inside `dir`. */
export function listDir(view: View, dir: string): string[] {
  const prefix = dir === '/' ? '/' : `${dir}/`;
  const names = new Set<string>();
  for (const p of [...view.dirs, ...view.files.map((f) => f.path)]) {
    if (p !== dir && p.startsWith(prefix) && !p.slice(prefix.length).includes('/')) names.add(p.slice(prefix.length));
  }
  return [...names].sort();
}
