// Proves mount --files for FAT: FAT12, FAT16 and FAT32 partitions (made by mkfs.fat, filled by mcopy) are found, named as blkid names them, and mounted with fusefat on files/pN, every file reading back with the sha256 recorded when it was generated; test-restore checks them (fsck.vfat -n, then every file) and fails, naming the volume, on a damaged FAT.
import t from 'tap';
import { copyFile, mkdir, opendir } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../src/chain/backup.js';
import { patchFile, readFileAt, sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { makeFatDisk } from './helpers/fs-fixtures.js';
import { MiB, mountCommandLine, ourMounts, runNode, sha256Range, tool, unmountLeftovers } from './helpers/mount.js';

/** Regular files under `root`, relative, "/" separated. */
async function listFiles(root: string, under = ''): Promise<string[]> {
  const out: string[] = [];
  for await (const e of await opendir(join(root, under))) {
    const rel = under ? `${under}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...(await listFiles(root, rel)));
    else if (e.isFile()) out.push(rel);
  }
  return out;
}

t.test('FAT volumes under --files and test-restore', async (t) => {
  const { dir, cleanup } = await tempDir('mount-fat');
  const env = { IMAGEKEEP_RUN_DIR: join(dir, 'run') };
  const { cli, note } = await mountCommandLine(dir);
  t.comment(`imagekeep: ${note}`);
  const ik = (args: string[]): Promise<RunResult> => runNode([cli, ...args], env);
  t.teardown(async () => {
    await unmountLeftovers(dir);
    await cleanup();
  });

  const disk = join(dir, 'fat.img');
  const { partitions, files } = await makeFatDisk(disk, 80 * MiB, 3, dir);
  // The fixture is what we think it is, by blkid.
  for (const p of partitions) {
    const b = await tool('blkid', ['-p', '-O', String(p.offset), '-S', String(p.length), '-o', 'export', disk]);
    t.match(b.stdout.toString(), new RegExp(`VERSION=FAT${p.bits}\\n`), `blkid: p${p.number} is FAT${p.bits}`);
  }
  const { path: image } = await backup(disk, join(dir, 'backups'), { forensic: true, workers: 0 });

  await t.test('mount --files: fusefat on files/pN, every file as generated', async (t) => {
    const mnt = join(dir, 'mnt');
    await mkdir(mnt);
    const r = await ik(['mount', image, mnt, '--files', '--json']);
    t.equal(r.code, 0, r.stderr);
    t.equal(r.stderr, '', 'no warnings');
    const info = JSON.parse(r.stdout) as { nested: string[]; failed: unknown[]; view: { scheme: string; volumes: { name: string; fs: string; version?: string; offset: number; length: number }[] } };
    t.equal(info.view.scheme, 'mbr');
    t.same(info.view.volumes.map((v) => [v.name, v.fs, v.version, v.offset, v.length]),
      partitions.map((p) => [`p${p.number}`, 'fat', `FAT${p.bits}`, p.offset, p.length]), 'FAT12, FAT16, FAT32 found at their offsets');
    t.same(info.nested, partitions.map((p) => join(mnt, `files/p${p.number}`)), 'each mounted on files/pN');
    t.same(info.failed, []);
    for (const p of partitions) {
      t.equal(await sha256File(join(mnt, `partitions/p${p.number}.raw`)), await sha256Range(disk, p.offset, p.length), `partitions/p${p.number}.raw is its range of the disk`);
    }
    const bad: string[] = [];
    let same = 0;
    for (const f of files) {
      const got = await sha256File(join(mnt, 'files', `p${f.partition}`, f.path)).catch((e: Error) => e.message);
      if (got === f.sha256) same++;
      else bad.push(`p${f.partition}/${f.path}: ${got}`);
    }
    t.same(bad, [], `${same} files read through fusefat have the sha256 recorded at generation`);
    // fusefat lists the volume label's directory entry as an empty file (documented in docs/mount.md).
    for (const p of partitions) {
      t.same((await listFiles(join(mnt, `files/p${p.number}`))).map((n) => n.toLowerCase()).sort(),
        [...files.filter((f) => f.partition === p.number).map((f) => f.path.toLowerCase()), `fat${p.bits}vol`].sort(), `files/p${p.number} holds exactly the files written (and the label)`);
    }
    const ro = await tool('touch', [join(mnt, 'files/p1/new.txt')]);
    t.not(ro.code, 0, 'files/p1 is read-only');
    const u = await ik(['umount', mnt]);
    t.equal(u.code, 0, u.stderr);
    t.same(await ourMounts(dir), [], 'umount removed the fusefat mounts and ours');
  });

  await t.test('test-restore checks FAT volumes', async (t) => {
    const r = await ik(['test-restore', image, '--json']);
    t.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout) as { ok: boolean; volumes: { name: string; fs: string; ok: boolean; files?: number; checks: { tool: string; ok: boolean }[] }[] };
    t.same(rep.volumes.map((v) => [v.name, v.fs, v.ok, v.files, v.checks.map((c) => c.tool)]),
      partitions.map((p) => [`p${p.number}`, 'fat', true, files.filter((f) => f.partition === p.number).length + 1, ['fsck.vfat -n', 'fusefat -o ro + read every file']]),
      'each FAT volume passes fsck.vfat -n and has every file read (and the label entry fusefat shows as one)');
    t.same(await ourMounts(dir), [], 'test-restore unmounted');
  });

  await t.test('test-restore fails, naming the volume, on a damaged FAT', async (t) => {
    const bent = join(dir, 'bent.img');
    await copyFile(disk, bent);
    // The FAT32 volume's first FAT: cluster 3 (the first after the root directory) marked bad, under a file or directory.
    const p3 = partitions[2]!;
    const boot = await readFileAt(bent, p3.offset, 512);
    const fatStart = p3.offset + boot.readUInt16LE(14) * boot.readUInt16LE(11);
    await patchFile(bent, fatStart + 4 * 3, Buffer.from([0xf7, 0xff, 0xff, 0x0f]));
    const { path: badImage } = await backup(bent, join(dir, 'bent-backups'), { forensic: true, workers: 0 });
    const r = await ik(['test-restore', badImage]);
    t.equal(r.code, 1, 'exit status 1');
    t.match(r.stdout, /OK\s+p1 \(fat/, 'the FAT12 volume passes');
    t.match(r.stdout, /OK\s+p2 \(fat/, 'the FAT16 volume passes');
    t.match(r.stdout, /FAILED\s+p3 \(fat/, 'the damaged FAT32 volume fails');
    t.match(r.stderr, /^imagekeep: test-restore of .* failed: volume p3 \(fat\): fsck\.vfat -n exit 1/);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one error line');
    t.same(await ourMounts(dir), []);
  });
});
