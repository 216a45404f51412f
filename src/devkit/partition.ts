/**
 * Partition tables for fixture disks. Writing: a pure planner turns the requested volumes
 * into an sfdisk script (sfdisk places logical partitions and their EBR gaps itself).
 * Reading: the layout is always read back from the image with `sfdisk --json` and each
 * partition's filesystem with `blkid -p -O offset -S size` — so a disk made by one process
 * can be opened by another (the CLI's `mutate`), and the layout can never drift from what
 * is on the disk.
 */
import { DevkitUsageError, run } from './exec.js';
import type { Prng } from './prng.js';

export type FsKind = 'ntfs' | 'ext4' | 'fat' | 'none';
export type Scheme = 'gpt' | 'mbr';

export interface VolumeSpec {
  fs: FsKind;
  /** Bytes, rounded down to whole MiB; omit on the last volume to take the rest of the disk. */
  size?: number;
  label?: string;
}

export interface Partition {
  /** The partition number as Linux names it (sda5 is 5): logicals start at 5. */
  number: number;
  offset: number;
  length: number;
  fs: FsKind;
  /** Filesystem label as blkid reports it; undefined when there is none. */
  label: string | undefined;
  /** GPT type GUID, or MBR type as hex without 0x ("83"). */
  type: string;
  logical: boolean;
}

export interface Layout {
  scheme: Scheme;
  /** Size of the disk image in bytes. */
  size: number;
  sectorSize: number;
  /** Partitions that hold data (not the extended container), by number. */
  partitions: Partition[];
  /** The MBR extended partition holding the logicals, if any. */
  extended: { number: number; offset: number; length: number } | undefined;
}

export const MiB = 1024 * 1024;
const SECTOR = 512;

const GPT_BASIC_DATA = 'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7';
const GPT_LINUX_FS = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const GPT_TYPE: Record<FsKind, string> = { ntfs: GPT_BASIC_DATA, fat: GPT_BASIC_DATA, ext4: GPT_LINUX_FS, none: GPT_LINUX_FS };
const MBR_TYPE: Record<FsKind, string> = { ntfs: '7', fat: 'c', ext4: '83', none: 'da' };
const MBR_EXTENDED = new Set(['5', 'f', '85']);

export interface TablePlan {
  script: string;
  /** The volumes in partition-number order, with sizes resolved. */
  volumes: (VolumeSpec & { size: number | undefined })[];
}

function uuidFrom(rng: Prng): string {
  const h = rng.hex(32);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`.toUpperCase();
}

/**
 * The sfdisk script for `volumes` on a disk of `diskSize` bytes. With `logical` (MBR only),
 * the first two volumes are primaries 1 and 2, partition 3 is an extended partition over
 * the rest of the disk and the others are logicals 5, 6, ...
 */
export function planTable(scheme: Scheme, diskSize: number, volumes: VolumeSpec[], logical: boolean, rng: Prng): TablePlan {
  if (volumes.length === 0) throw new DevkitUsageError('a disk needs at least one volume');
  if (logical && scheme !== 'mbr') throw new DevkitUsageError('logical partitions need scheme "mbr"');
  if (logical && volumes.length < 3) throw new DevkitUsageError(`logical layout needs at least 3 volumes (2 primaries + logicals), got ${volumes.length}`);
  if (!logical && scheme === 'mbr' && volumes.length > 4) throw new DevkitUsageError(`MBR without logicals holds 4 partitions, got ${volumes.length}; pass logical: true`);
  if (diskSize % MiB !== 0 || diskSize < 8 * MiB) throw new DevkitUsageError(`disk size must be a multiple of 1 MiB and at least 8 MiB, got ${diskSize}`);
  const resolved = volumes.map((v, i) => {
    if (v.size === undefined && i !== volumes.length - 1) throw new DevkitUsageError(`volume ${i + 1} has no size; only the last may take the rest`);
    const size = v.size === undefined ? undefined : Math.floor(v.size / MiB) * MiB;
    if (size !== undefined && size < MiB) throw new DevkitUsageError(`volume ${i + 1} is ${v.size} bytes; the smallest is 1 MiB`);
    return { ...v, size };
  });
  // 1 MiB before the first partition; GPT keeps 33 sectors at the end for its backup (sfdisk
  // rounds the last partition down to 1 MiB); each logical is preceded by 1 MiB for its EBR.
  const overhead = MiB + (scheme === 'gpt' ? MiB : 0) + (logical ? (resolved.length - 2) * MiB : 0);
  const asked = resolved.reduce((sum, v) => sum + (v.size ?? MiB), 0);
  if (asked + overhead > diskSize) {
    throw new DevkitUsageError(`volumes need ${asked} bytes plus ${overhead} bytes of table overhead, more than the disk's ${diskSize}`);
  }

  const lines: string[] = [];
  if (scheme === 'gpt') {
    lines.push('label: gpt', `label-id: ${uuidFrom(rng)}`);
  } else {
    lines.push('label: dos', `label-id: 0x${rng.hex(8)}`);
  }
  lines.push('unit: sectors');
  const entry = (v: (typeof resolved)[number], first: boolean): string => {
    const fields: string[] = [];
    if (first) fields.push(`start=${MiB / SECTOR}`);
    if (v.size !== undefined) fields.push(`size=${v.size / SECTOR}`);
    if (scheme === 'gpt') {
      fields.push(`type=${GPT_TYPE[v.fs]}`, `uuid=${uuidFrom(rng)}`);
      if (v.label) fields.push(`name="${v.label.replace(/"/g, '')}"`);
    } else {
      fields.push(`type=${MBR_TYPE[v.fs]}`);
    }
    return fields.join(', ');
  };
  resolved.forEach((v, i) => {
    if (logical && i === 2) lines.push('type=5');
    lines.push(entry(v, i === 0));
  });
  return { script: `${lines.join('\n')}\n`, volumes: resolved };
}

interface SfdiskJson {
  partitiontable: {
    label: string;
    sectorsize?: number;
    partitions?: { node: string; start: number; size: number; type: string }[];
  };
}

/** The partition number from an sfdisk node name ("disk.img5" is 5). */
function partitionNumber(node: string, device: string): number {
  const suffix = node.startsWith(device) ? node.slice(device.length) : (/(\d+)$/.exec(node)?.[1] ?? '');
  const n = Number(suffix.replace(/^p/, ''));
  if (!Number.isInteger(n) || n < 1) throw new Error(`cannot read a partition number from sfdisk node ${JSON.stringify(node)}`);
  return n;
}

/** What blkid finds at `offset` (limited to `length` bytes): filesystem kind and label. */
export async function probeFs(path: string, offset: number, length: number): Promise<{ fs: FsKind; label: string | undefined }> {
  // blkid exits 2 when it finds nothing: an unformatted partition.
  const r = await run('blkid', ['-p', '-O', String(offset), '-S', String(length), '-o', 'export', path], { okCodes: [2] });
  const vars = new Map<string, string>();
  for (const line of r.stdout.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) vars.set(line.slice(0, eq), line.slice(eq + 1));
  }
  const type = vars.get('TYPE');
  const fs: FsKind = type === 'ntfs' ? 'ntfs' : type === 'ext4' || type === 'ext3' || type === 'ext2' ? 'ext4' : type === 'vfat' ? 'fat' : 'none';
  return { fs, label: fs === 'none' ? undefined : vars.get('LABEL') };
}

/** Reads the partition table and each partition's filesystem from the image itself. */
export async function readLayout(path: string, size: number): Promise<Layout> {
  const r = await run('sfdisk', ['--json', path]);
  const table = (JSON.parse(r.stdout) as SfdiskJson).partitiontable;
  const scheme: Scheme = table.label === 'gpt' ? 'gpt' : table.label === 'dos' ? 'mbr' : (() => {
    throw new DevkitUsageError(`${path} has a ${table.label} partition table; expected gpt or dos`);
  })();
  const sectorSize = table.sectorsize ?? SECTOR;
  const partitions: Partition[] = [];
  let extended: Layout['extended'];
  for (const p of table.partitions ?? []) {
    const number = partitionNumber(p.node, path);
    const offset = p.start * sectorSize;
    const length = p.size * sectorSize;
    const type = scheme === 'gpt' ? p.type.toUpperCase() : p.type.toLowerCase();
    if (scheme === 'mbr' && MBR_EXTENDED.has(type)) {
      extended = { number, offset, length };
      continue;
    }
    const { fs, label } = await probeFs(path, offset, length);
    partitions.push({ number, offset, length, fs, label, type, logical: scheme === 'mbr' && number >= 5 });
  }
  partitions.sort((a, b) => a.number - b.number);
  return { scheme, size, sectorSize, partitions, extended };
}

/** Default volumes for a disk of `size` bytes. */
export function defaultVolumes(size: number, logical: boolean): VolumeSpec[] {
  const part = (fraction: number): number => Math.max(MiB, Math.floor((size * fraction) / MiB) * MiB);
  if (logical) {
    return [
      { fs: 'ntfs', size: part(0.3), label: 'windows' },
      { fs: 'ext4', size: part(0.2), label: 'root' },
      { fs: 'ext4', size: part(0.25), label: 'home' },
      { fs: 'fat', label: 'SHARED' },
    ];
  }
  return [
    { fs: 'ntfs', size: part(0.5), label: 'windows' },
    { fs: 'ext4', label: 'data' },
  ];
}
