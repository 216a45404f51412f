// Filesystem fixtures made with the real tools (sfdisk, mkfs.fat + mtools, mkfs.ext4 -d), every file's sha256 recorded as it is generated: an MBR disk with FAT12, FAT16 and FAT32 partitions, and single-volume images.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { prng } from './cli.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const SECTOR = 512;
// mtools refuses images whose geometry it finds odd; the fixtures are ours.
const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1' };

export interface FixtureFile {
  /** Relative path, "/" separated. */
  path: string;
  size: number;
  sha256: string;
}

export type FatBits = 12 | 16 | 32;

/**
 * `count` files of seeded random bytes under `dir`, some in nested directories, sizes from
 * empty to ~1.5 MiB (several clusters, past one read-ahead window). Names mix case and run
 * past 8.3, so FAT keeps them as long names.
 */
export async function stageTree(dir: string, seed: number, count: number): Promise<FixtureFile[]> {
  const bytes = prng(seed);
  const files: FixtureFile[] = [];
  for (let i = 0; i < count; i++) {
    const size = i === 0 ? 0 : i === 1 ? 1_500_000 + seed : (bytes(4).readUInt32LE(0) % 200_000) + 1;
    const sub = i % 3 === 0 ? '' : i % 3 === 1 ? 'Docs/' : 'Docs/Deeper Level/';
    const path = `${sub}File-${seed}-${String(i).padStart(2, '0')}.bin`;
    const data = bytes(size);
    await mkdir(dirname(join(dir, path)), { recursive: true });
    await writeFile(join(dir, path), data);
    files.push({ path, size, sha256: createHash('sha256').update(data).digest('hex') });
  }
  return files;
}

/** mkfs.fat of `bits` on bytes [offset, offset + length) of `image`, then the tree of `staging` copied in with mcopy. */
export async function formatFat(image: string, offset: number, length: number, bits: FatBits, label: string, staging: string): Promise<void> {
  // FAT32 of a few tens of MiB needs one-sector clusters to have the 65525 clusters FAT32 requires.
  const args = ['-F', String(bits), ...(bits === 32 ? ['-s', '1'] : []), '-n', label, '--offset', String(offset / SECTOR), image, String(length / 1024)];
  await execFileP('mkfs.fat', args);
  const entries = await readdir(staging);
  if (entries.length > 0) {
    await execFileP('mcopy', ['-s', '-i', `${image}@@${offset}`, ...entries.map((e) => join(staging, e)), '::/'], { env: MTOOLS_ENV });
  }
}

export interface FatPartition {
  number: number;
  offset: number;
  length: number;
  bits: FatBits;
  /** MBR type id: 0x01 FAT12, 0x0e FAT16 (LBA), 0x0c FAT32 (LBA). */
  type: number;
}

/**
 * A sparse MBR disk of `size` bytes: p1 FAT12 (4 MiB), p2 FAT16 (24 MiB), p3 FAT32 (the rest,
 * at least 40 MiB), each holding its own seeded tree.
 */
export async function makeFatDisk(path: string, size: number, seed: number, scratch: string): Promise<{ partitions: FatPartition[]; files: (FixtureFile & { partition: number })[] }> {
  const plan: FatPartition[] = [
    { number: 1, offset: 1 * MiB, length: 4 * MiB, bits: 12, type: 0x01 },
    { number: 2, offset: 5 * MiB, length: 24 * MiB, bits: 16, type: 0x0e },
    { number: 3, offset: 29 * MiB, length: size - 29 * MiB, bits: 32, type: 0x0c },
  ];
  if (plan[2]!.length < 40 * MiB) throw new Error(`makeFatDisk needs at least 69 MiB, got ${size}`);
  const fh = await open(path, 'w');
  await fh.truncate(size);
  await fh.close();
  const script = `label: dos\n${plan.map((p) => `start=${p.offset / SECTOR}, size=${p.length / SECTOR}, type=${p.type.toString(16)}`).join('\n')}\n`;
  await new Promise<void>((resolve, reject) => {
    const child = execFile('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', path], (err) => (err ? reject(err) : resolve()));
    child.stdin!.end(script);
  });
  const files: (FixtureFile & { partition: number })[] = [];
  for (const p of plan) {
    const staging = await mkdtemp(join(scratch, `fat${p.bits}-`));
    try {
      const tree = await stageTree(staging, seed * 10 + p.number, 8);
      await formatFat(path, p.offset, p.length, p.bits, `FAT${p.bits}VOL`, staging);
      files.push(...tree.map((f) => ({ ...f, partition: p.number })));
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
  }
  return { partitions: plan, files };
}

/** A volume image (no partition table) of `size` bytes: FAT of `bits`, or ext4 (mkfs.ext4 -d), holding a seeded tree. */
export async function makeVolumeImage(path: string, fs: { fat: FatBits } | 'ext4', size: number, seed: number, scratch: string): Promise<FixtureFile[]> {
  const staging = await mkdtemp(join(scratch, 'volume-'));
  try {
    const tree = await stageTree(staging, seed, 10);
    const fh = await open(path, 'w');
    await fh.truncate(size);
    await fh.close();
    if (fs === 'ext4') await execFileP('mkfs.ext4', ['-q', '-F', '-d', staging, path]);
    else await formatFat(path, 0, size, fs.fat, 'VOLUME', staging);
    return tree;
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
}
