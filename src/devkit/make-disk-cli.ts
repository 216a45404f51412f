#!/usr/bin/env node
/**
 * Command line for the simulated disks, for the demo script between backups:
 *
 *   node dist/devkit/make-disk-cli.js create <path> [--size 1G] [--seed N] [--scheme gpt|mbr] [--logical]
 *                                               [--volume ntfs:512M:windows --volume ext4::data]
 *   node dist/devkit/make-disk-cli.js mutate <path> --seed N [--create 4] [--modify 4] [--remove 2] [--bytes 2M]
 *   node dist/devkit/make-disk-cli.js fill <path> [--seed N]        fill free space with garbage, then delete
 *   node dist/devkit/make-disk-cli.js manifest <path> [--out FILE]  every file with size and sha256 (JSON)
 *   node dist/devkit/make-disk-cli.js hash <path>                   sha256 of the whole image
 *   node dist/devkit/make-disk-cli.js layout <path>                 partitions and filesystems (JSON)
 *   node dist/devkit/make-disk-cli.js damage-ext <path> --partition N
 *
 * Each command is its own process, so nothing is remembered between them: the layout is
 * read back from the image (`sfdisk --json` for the table, `blkid -p -O offset` for each
 * filesystem). Reports go to stdout as JSON; errors to stderr with exit status 1 (2 for
 * bad arguments).
 */
import { writeFile } from 'node:fs/promises';
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { DevkitUsageError } from './exec.js';
import type { FsKind, Scheme, VolumeSpec } from './partition.js';
import { makeDisk, openDisk, type SimDisk } from './sim-disk.js';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "1G", "512M", "1.5G", "4096" (bytes; K/M/G/T are powers of 1024, an optional i/iB/B is allowed). */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`"${text}" is not a size (examples: 4096, 512M, 1G)`);
  const bytes = Number(m[1]) * (UNITS[(m[2] ?? '').toUpperCase()] ?? 1);
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError(`"${text}" is not a whole number of bytes`);
  return bytes;
}

function parseCount(text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError(`"${text}" is not a non-negative integer`);
  return n;
}

function parseSeed(text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`"${text}" is not an integer seed`);
  return n;
}

/** "fs:size:label", size and label optional: "ntfs:512M:windows", "ext4::data", "none:16M". */
function parseVolume(text: string, previous: VolumeSpec[] = []): VolumeSpec[] {
  const [fs, size, label] = text.split(':');
  if (fs !== 'ntfs' && fs !== 'ext4' && fs !== 'fat' && fs !== 'none') {
    throw new InvalidArgumentError(`"${text}": filesystem must be ntfs, ext4, fat or none`);
  }
  const spec: VolumeSpec = { fs: fs as FsKind };
  if (size) spec.size = parseSize(size);
  if (label) spec.label = label;
  return [...previous, spec];
}

function print(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

async function withDisk<T>(path: string, seed: number | undefined, fn: (disk: SimDisk) => Promise<T>): Promise<T> {
  const disk = await openDisk(path, seed === undefined ? {} : { seed });
  try {
    return await fn(disk);
  } finally {
    await disk.cleanup();
  }
}

const program = new Command()
  .name('make-disk-cli')
  .description('Simulated source disks for imagekeep tests and demos (real partition tables and filesystems).')
  // Throw instead of exiting, so argument errors get status 2 like our own usage errors.
  .exitOverride();

program
  .command('create')
  .description('make a sparse image with a partition table, filesystems and a seeded file set')
  .argument('<path>', 'image file to create (replaced if it exists)')
  .option('--size <size>', 'disk size', parseSize, 2 ** 30)
  .option('--seed <n>', 'seed for the file set and ids', parseSeed, 1)
  .option('--scheme <scheme>', 'gpt or mbr', 'gpt')
  .option('--logical', 'MBR with 2 primaries + extended partition with logicals', false)
  .option('--volume <fs:size:label>', 'a volume, repeatable, in partition order (last may omit size)', parseVolume)
  .option('--files <n>', 'files per volume', parseCount)
  .option('--bytes <size>', 'initial content per volume', parseSize)
  .action(async (path: string, o: { size: number; seed: number; scheme: string; logical: boolean; volume?: VolumeSpec[]; files?: number; bytes?: number }) => {
    if (o.scheme !== 'gpt' && o.scheme !== 'mbr') throw new DevkitUsageError(`--scheme must be gpt or mbr, got ${o.scheme}`);
    const disk = await makeDisk({
      path,
      size: o.size,
      seed: o.seed,
      scheme: o.scheme as Scheme,
      logical: o.logical,
      ...(o.volume ? { volumes: o.volume } : {}),
      ...(o.files !== undefined ? { files: o.files } : {}),
      ...(o.bytes !== undefined ? { bytes: o.bytes } : {}),
    });
    try {
      print({ layout: disk.layout, files: disk.initialFiles?.length ?? 0 });
    } finally {
      await disk.cleanup();
    }
  });

program
  .command('mutate')
  .description('random file changes (create, rewrite, append, delete), printed as JSON')
  .argument('<path>', 'image made by create')
  .requiredOption('--seed <n>', 'seed for this round', parseSeed)
  .option('--create <n>', 'files to create', parseCount)
  .option('--modify <n>', 'files to rewrite part of or append to', parseCount)
  .option('--remove <n>', 'files to delete', parseCount)
  .option('--bytes <size>', 'bytes to write in total', parseSize)
  .option('--partition <n...>', 'only these partitions')
  .action(async (path: string, o: { seed: number; create?: number; modify?: number; remove?: number; bytes?: number; partition?: string[] }) => {
    const report = await withDisk(path, undefined, (disk) =>
      disk.mutate({
        seed: o.seed,
        ...(o.create !== undefined ? { create: o.create } : {}),
        ...(o.modify !== undefined ? { modify: o.modify } : {}),
        ...(o.remove !== undefined ? { remove: o.remove } : {}),
        ...(o.bytes !== undefined ? { bytes: o.bytes } : {}),
        ...(o.partition ? { partitions: o.partition.map(parseCount) } : {}),
      }),
    );
    print(report);
  });

program
  .command('fill')
  .description('fill every volume with random files, then delete them (garbage in free space)')
  .argument('<path>')
  .option('--seed <n>', 'seed for the garbage', parseSeed, 1)
  .action(async (path: string, o: { seed: number }) => {
    print(await withDisk(path, undefined, (disk) => disk.fillFreeSpaceThenDelete({ seed: o.seed })));
  });

program
  .command('manifest')
  .description('every file of every volume with size and sha256 (JSON)')
  .argument('<path>')
  .option('--out <file>', 'write the JSON here instead of stdout')
  .action(async (path: string, o: { out?: string }) => {
    const manifest = await withDisk(path, undefined, (disk) => disk.manifest());
    if (o.out) await writeFile(o.out, `${JSON.stringify(manifest, null, 2)}\n`);
    else print(manifest);
  });

program
  .command('hash')
  .description('sha256 of the whole image')
  .argument('<path>')
  .action(async (path: string) => {
    process.stdout.write(`${await withDisk(path, undefined, (disk) => disk.hash())}\n`);
  });

program
  .command('layout')
  .description('partitions and filesystems as read from the image (JSON)')
  .argument('<path>')
  .action(async (path: string) => {
    print(await withDisk(path, undefined, async (disk) => disk.layout));
  });

program
  .command('damage-ext')
  .description('corrupt ext4 metadata so e2fsck -fn fails')
  .argument('<path>')
  .requiredOption('--partition <n>', 'partition number', parseCount)
  .action(async (path: string, o: { partition: number }) => {
    await withDisk(path, undefined, (disk) => disk.damageExtMetadata(o.partition));
  });

program.parseAsync(process.argv).catch((err: unknown) => {
  if (err instanceof CommanderError) {
    // Commander has already printed its message (or the help, with status 0).
    process.exitCode = err.exitCode === 0 ? 0 : 2;
    return;
  }
  const e = err as { code?: string; message?: string };
  process.stderr.write(`make-disk-cli: ${e.message ?? String(err)}\n`);
  process.exitCode = e.code === 'DEVKIT_USAGE' ? 2 : 1;
});
