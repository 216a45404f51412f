/**
 * What a mounted point shows: a small fixed tree of files, each a byte range of the point
 * (read-only, or written into the --writable overlay; the tree itself never changes). A disk image shows `disk.raw` and `partitions/pN.raw` (Linux numbering: MBR
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
  /** FAT12, FAT16 or FAT32 for a FAT volume (as blkid's VERSION). */
  version?: string;
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

/**
 * FAT12/16/32 by its boot sector (content, not the partition type: MBR 0x07 and GPT "basic
 * data" cover NTFS, exFAT and FAT alike, and a 0x0c partition may hold anything): 0x55AA, a
 * jump, and a BIOS parameter block whose fields are all in range. NTFS and exFAT have zero
 * FATs and reserved sectors there, so they never pass. Returns the FAT width as Linux picks
 * it (no 16-bit FAT size means FAT32, else fewer than 4085 clusters means FAT12), or null.
 */
export function probeFat(head: Uint8Array): 'FAT12' | 'FAT16' | 'FAT32' | null {
  if (head.length < 512 || head[510] !== 0x55 || head[511] !== 0xaa) return null;
  if (!((head[0] === 0xeb && head[2] === 0x90) || head[0] === 0xe9)) return null;
  const view = new DataView(head.buffer, head.byteOffset, 512);
  const bytesPerSector = view.getUint16(11, true);
  const sectorsPerCluster = head[13]!;
  const reserved = view.getUint16(14, true);
  const fats = head[16]!;
  const rootEntries = view.getUint16(17, true);
  const totalSectors = view.getUint16(19, true) || view.getUint32(32, true);
  const media = head[21]!;
  const fatSize16 = view.getUint16(22, true);
  const fatSize = fatSize16 || view.getUint32(36, true);
  if (![512, 1024, 2048, 4096].includes(bytesPerSector)) return null;
  if (sectorsPerCluster === 0 || (sectorsPerCluster & (sectorsPerCluster - 1)) !== 0) return null;
  if (reserved === 0 || fats === 0 || fats > 4 || (media !== 0xf0 && media < 0xf8)) return null;
  if (totalSectors === 0 || fatSize === 0) return null;
  if (fatSize16 === 0) return 'FAT32';
  const rootSectors = Math.ceil((rootEntries * 32) / bytesPerSector);
  const clusters = Math.floor((totalSectors - reserved - fats * fatSize - rootSectors) / sectorsPerCluster);
  return clusters < 4085 ? 'FAT12' : 'FAT16';
}

/** The filesystem a volume's first 8 KiB show, and its version where it has several (FAT12/16/32). */
export function probeFs(head: Uint8Array): { fs: VolumeFs; version?: string } {
  if (probeNtfs(head)) return { fs: 'ntfs' };
  if (probeExt(head)) return { fs: 'ext' };
  const fat = probeFat(head);
  if (fat) return { fs: 'fat', version: fat };
  return { fs: 'unknown' };
}

async function headOf(dev: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(Math.min(8192, length));
  await dev.read(buf, offset);
  return buf;
}

/**
 * The view of a point. `kind` is what the image's header says; a "disk" with no partition
 * table whose first sector is a filesystem is shown as a volume too: a volume backed up with
 * --forensic (which skips the filesystem analysis that names volumes) or a FAT volume
 * (which backup's analysis does not read) is still one volume, as Linux shows such a disk.
 */
export async function buildView(dev: BlockDevice, kind: 'disk' | 'volume', withFiles: boolean): Promise<View> {
  if (kind === 'volume') return volumeView(dev, probeFs(await headOf(dev, 0, dev.size)), withFiles);
  const table = await readPartitionTable(dev);
  if (table.scheme === 'none') {
    const head = probeFs(await headOf(dev, 0, dev.size));
    if (head.fs !== 'unknown') return volumeView(dev, head, withFiles);
  }
  const dirs = ['/'];
  const files: ViewFile[] = [{ path: '/disk.raw', offset: 0, length: dev.size }];
  const volumes: ViewVolume[] = [];
  for (const p of table.partitions) {
    if (table.scheme === 'mbr' && isExtendedType(p.type)) continue;
    const file = { path: `/partitions/p${p.number}.raw`, offset: p.offset, length: p.length };
    files.push(file);
    volumes.push({ name: `p${p.number}`, number: p.number, file, ...probeFs(await headOf(dev, p.offset, p.length)) });
  }
  if (volumes.length > 0) dirs.push('/partitions');
  if (withFiles) {
    dirs.push('/files');
    for (const v of volumes) if (v.fs !== 'unknown') dirs.push(`/files/${v.name}`);
  }
  return { kind, scheme: table.scheme, files, volumes, dirs };
}

function volumeView(dev: BlockDevice, fs: { fs: VolumeFs; version?: string }, withFiles: boolean): View {
  const file = { path: '/volume.raw', offset: 0, length: dev.size };
  const dirs = ['/'];
  if (withFiles && fs.fs !== 'unknown') dirs.push('/files', '/files/volume');
  return { kind: 'volume', scheme: 'volume', files: [file], volumes: [{ name: 'volume', file, ...fs }], dirs };
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
