// Proves mount of a volume image (a backup of one filesystem, no partition table): the view is volume.raw, hashing to the source as generated; --files mounts the volume (ext4 with fuse2fs, FAT with fusefat) on files/volume with every file as generated; test-restore checks it.
import t from 'tap';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../src/chain/backup.js';
import { sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { makeVolumeImage, type FatBits } from './helpers/fs-fixtures.js';
import { MiB, mountCommandLine, ourMounts, runNode, unmountLeftovers } from './helpers/mount.js';

t.test('mount a volume image', async (t) => {
  const { dir, cleanup } = await tempDir('mount-vol');
  const env = { IMAGEKEEP_RUN_DIR: join(dir, 'run') };
  const { cli, note } = await mountCommandLine(dir);
  t.comment(`imagekeep: ${note}`);
  const ik = (args: string[]): Promise<RunResult> => runNode([cli, ...args], env);
  t.teardown(async () => {
    await unmountLeftovers(dir);
    await cleanup();
  });

  const cases: { name: string; seed: number; fs: { fat: FatBits } | 'ext4'; size: number; viewFs: string; version?: string; mounter: string }[] = [
    { name: 'ext4', seed: 51, fs: 'ext4', size: 24 * MiB, viewFs: 'ext', mounter: 'fuse2fs' },
    { name: 'FAT16', seed: 52, fs: { fat: 16 }, size: 20 * MiB, viewFs: 'fat', version: 'FAT16', mounter: 'fusefat' },
  ];
  for (const c of cases) {
    await t.test(`${c.name} volume image`, async (t) => {
      const source = join(dir, `${c.name}.img`);
      const files = await makeVolumeImage(source, c.fs, c.size, c.seed, dir);
      const sourceSha = await sha256File(source);
      // Not --forensic: a volume image is recognised by reading its filesystem (its free space is fresh zeros here).
      const r0 = await backup(source, join(dir, `backups-${c.name}`), { workers: 0 });
      const mnt = join(dir, `mnt-${c.name}`);
      await mkdir(mnt);
      const r = await ik(['mount', r0.path, mnt, '--files', '--json']);
      t.equal(r.code, 0, r.stderr);
      const info = JSON.parse(r.stdout) as { nested: string[]; view: { kind: string; scheme: string; files: { path: string; offset: number; length: number }[]; volumes: { name: string; fs: string; version?: string }[] } };
      t.equal(info.view.kind, 'volume', 'the image is of a volume');
      t.same(info.view.files, [{ path: '/volume.raw', offset: 0, length: c.size }], 'the view is volume.raw alone');
      t.same(info.view.volumes.map((v) => [v.name, v.fs, v.version]), [['volume', c.viewFs, c.version]]);
      t.same(info.nested, [join(mnt, 'files/volume')], `${c.mounter} on files/volume`);
      t.equal(await sha256File(join(mnt, 'volume.raw')), sourceSha, 'volume.raw hashes to the source as generated');
      const bad: string[] = [];
      for (const f of files) {
        const got = await sha256File(join(mnt, 'files/volume', f.path)).catch((e: Error) => e.message);
        if (got !== f.sha256) bad.push(`${f.path}: ${got}`);
      }
      t.same(bad, [], `${files.length} files read through files/volume have the sha256 recorded at generation`);
      const u = await ik(['umount', mnt]);
      t.equal(u.code, 0, u.stderr);
      t.same(await ourMounts(dir), []);

      const tr = await ik(['test-restore', r0.path, '--json']);
      t.equal(tr.code, 0, tr.stderr);
      const rep = JSON.parse(tr.stdout) as { volumes: { name: string; fs: string; ok: boolean; checks: { tool: string; ok: boolean }[] }[] };
      t.same(rep.volumes.map((v) => [v.name, v.fs, v.ok, v.checks.length]), [['volume', c.viewFs, true, 2]], 'test-restore checks the volume');
    });
  }
});
