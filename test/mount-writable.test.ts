// Proves mount --writable: writes through disk.raw and partitions/pN.raw read back (the two alias), the rest reads as captured, writes past a file's end fail with ENOSPC, the overlay is a sparse temporary file removed at umount (also after SIGKILL), NTFS and ext mount read-write under --files with changes debugfs/ntfscat see, a fresh mount shows the original bytes, and no chain file ever changes.
import t from 'tap';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readFile, readdir, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { makeDisk, type Manifest } from '../src/devkit/index.js';
import { backup } from '../src/chain/backup.js';
import { prng, sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { MiB, mountCommandLine, ourMounts, runNode, sha256Range, tool, unmountLeftovers } from './helpers/mount.js';

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** sha256 of every file of a folder, by name. */
async function folderShas(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const n of (await readdir(dir)).sort()) out[n] = await sha256File(join(dir, n));
  return out;
}

/** Waits until no process has `arg` as an argument (a FUSE daemon flushes after its umount returns). */
async function noProcessWith(arg: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    let found = false;
    for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
      const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
      if (cmd.split('\0').includes(arg)) found = true;
    }
    if (!found) return;
    await sleep(50);
  }
  throw new Error(`a process with argument ${arg} is still running`);
}

/** pwrite through the mount (async: the server is another process); resolves with bytes written or the error code. */
async function pwrite(path: string, data: Uint8Array, at: number): Promise<number | string> {
  let f;
  try {
    f = await open(path, 'r+');
    return (await f.write(data, 0, data.length, at)).bytesWritten;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? String(e);
  } finally {
    await f?.close();
  }
}

t.test('mount --writable', async (t) => {
  const { dir, cleanup } = await tempDir('mount-rw');
  const env = { IMAGEKEEP_RUN_DIR: join(dir, 'run') };
  const { cli, note } = await mountCommandLine(dir);
  t.comment(`imagekeep: ${note}`);
  const ik = (args: string[]): Promise<RunResult> => runNode([cli, ...args], env);
  t.teardown(async () => {
    await unmountLeftovers(dir);
    await cleanup();
  });

  // GPT: ext4 p1, NTFS p2, unformatted p3 (raw writes go there and to the gaps, never under a mounted filesystem).
  const disk = await makeDisk({
    path: join(dir, 'disk.img'), size: 64 * MiB, seed: 21, tmpDir: dir, files: 12, bytes: 2 * MiB,
    volumes: [{ fs: 'ext4', size: 20 * MiB }, { fs: 'ntfs', size: 20 * MiB }, { fs: 'none' }],
  });
  t.teardown(() => disk.cleanup());
  const folder = join(dir, 'backups');
  await backup(disk.path, folder, { forensic: true, workers: 0, at: Date.parse('2026-05-01T08:00:00Z') });
  await disk.mutate({ seed: 22, create: 3, modify: 3, remove: 2, bytes: MiB });
  const ref = join(dir, 'point.img');
  await new Promise((r) => spawn('cp', ['--sparse=always', disk.path, ref]).on('close', r));
  const { path: image } = await backup(disk.path, folder, { forensic: true, workers: 0, at: Date.parse('2026-05-01T09:00:00Z') });
  const pointSha = await disk.hash();
  const manifest: Manifest = await disk.manifest();
  const [p1, p2, p3] = disk.layout.partitions;
  const size = disk.layout.size;
  const chainBefore = await folderShas(folder);
  t.equal(Object.keys(chainBefore).filter((n) => /\.sp[fi]$/.test(n)).length, 2, `a chain of a full and an incremental (folder: ${Object.keys(chainBefore).join(', ')})`);

  await t.test('writes through disk.raw and partitions/p3.raw read back; the rest is as captured; the overlay is sparse and goes at umount', async (t) => {
    const mnt = join(dir, 'mnt-raw');
    const overlayDir = join(dir, 'overlays');
    await mkdir(mnt);
    await mkdir(overlayDir);
    const r = await ik(['mount', image, mnt, '--writable', '--overlay-dir', overlayDir, '--json']);
    t.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { overlay: string; pid: number };
    t.match(info.overlay, new RegExp(`^${overlayDir}/imagekeep-overlay-`), 'the overlay file is in --overlay-dir');
    t.same(await readdir(overlayDir), [info.overlay.split('/').pop()], 'and exists while mounted');

    // The expected disk: the point's bytes with the same writes applied by plain file I/O.
    const expected = join(dir, 'expected.img');
    await new Promise((r) => spawn('cp', ['--sparse=always', ref, expected]).on('close', r));
    const bytes = prng(99);
    const writes: { file: 'disk' | 'p3'; at: number; data: Buffer }[] = [
      { file: 'disk', at: 70_001, data: bytes(1000) }, // inside one overlay block, in the GPT gap
      { file: 'disk', at: 200_003, data: bytes(300_000) }, // many blocks, both ends partial
      { file: 'disk', at: size - 777, data: bytes(777) }, // ends exactly at the end of the disk
      { file: 'p3', at: 0, data: bytes(65536) },
      { file: 'p3', at: 12_345, data: bytes(5000) }, // partial blocks already held by the overlay
      { file: 'p3', at: p3!.length - 1000, data: bytes(1000) }, // ends at the end of the partition
      { file: 'p3', at: 5 * MiB + 100, data: bytes(3 * MiB) }, // larger than one FUSE request
    ];
    const fileOf = (w: { file: string }): string => join(mnt, w.file === 'disk' ? 'disk.raw' : 'partitions/p3.raw');
    const base = (w: { file: string }): number => (w.file === 'disk' ? 0 : p3!.offset);
    const exp = await open(expected, 'r+');
    for (const w of writes) {
      t.equal(await pwrite(fileOf(w), w.data, w.at), w.data.length, `${w.data.length} bytes written at ${w.at} of ${w.file}`);
      await exp.write(w.data, 0, w.data.length, base(w) + w.at);
    }
    await exp.close();
    // Later writes overlap earlier ones: the expected disk says what each range holds now.
    for (const w of writes) {
      const want = await sha256Range(expected, base(w) + w.at, w.data.length);
      t.equal(await sha256Range(fileOf(w), w.at, w.data.length), want, `read back from ${w.file} at ${w.at}`);
      if (w.file !== 'disk') t.equal(await sha256Range(join(mnt, 'disk.raw'), base(w) + w.at, w.data.length), want, `and through disk.raw at ${base(w) + w.at}`);
    }
    t.equal(await sha256Range(join(mnt, 'partitions/p3.raw'), 5 * MiB + 100, 3 * MiB), sha(writes[6]!.data), 'the last write, overlapped by none, is its own bytes');

    // Past the end: ENOSPC at the end, short crossing it (for the partition: not into what follows).
    t.equal(await pwrite(join(mnt, 'disk.raw'), bytes(10), size), 'ENOSPC', 'a write at the end of disk.raw fails with ENOSPC');
    t.equal(await pwrite(join(mnt, 'disk.raw'), bytes(10), size + 4096), 'ENOSPC', 'and past it');
    t.equal(await pwrite(join(mnt, 'partitions/p3.raw'), bytes(10), p3!.length), 'ENOSPC', 'a write at the end of p3.raw fails with ENOSPC');
    const crossing = bytes(8192);
    t.equal(await pwrite(join(mnt, 'partitions/p3.raw'), crossing, p3!.length - 4096), 4096, 'a write crossing the end of p3.raw stops there');
    const e2 = await open(expected, 'r+');
    await e2.write(crossing, 0, 4096, p3!.offset + p3!.length - 4096);
    await e2.close();
    const trunc = await tool('truncate', ['-s', '0', join(mnt, 'disk.raw')]);
    t.not(trunc.code, 0, 'truncating disk.raw fails');
    t.match(trunc.stderr, /Operation not permitted/);

    t.equal(await sha256File(join(mnt, 'disk.raw')), await sha256File(expected), 'disk.raw is the point with exactly these writes (nothing else changed)');
    t.equal(await sha256File(join(mnt, 'partitions/p3.raw')), await sha256Range(expected, p3!.offset, p3!.length), 'partitions/p3.raw too');
    t.equal(await sha256File(join(mnt, 'partitions/p1.raw')), await sha256Range(ref, p1!.offset, p1!.length), 'p1 untouched');

    const st = await stat(info.overlay);
    t.ok(st.blocks * 512 < 8 * MiB, `the overlay is sparse: ${st.blocks * 512} bytes allocated for a ${size}-byte disk (${writes.reduce((n, w) => n + w.data.length, 0)} bytes written)`);

    const u = await ik(['umount', mnt]);
    t.equal(u.code, 0, u.stderr);
    t.same(await readdir(overlayDir), [], 'umount removed the overlay file');
    t.same(await ourMounts(dir), [], 'nothing left mounted');
    t.same(await folderShas(folder), chainBefore, 'no chain file changed');
  });

  await t.test('--files: NTFS and ext read-write into the overlay; after umount a fresh mount shows the point as captured', async (t) => {
    const mnt = join(dir, 'mnt-files');
    await mkdir(mnt);
    const r = await ik(['mount', image, mnt, '--writable', '--files', '--json']);
    t.equal(r.code, 0, r.stderr);
    t.equal(r.stderr, '', 'no warnings');
    const info = JSON.parse(r.stdout) as { nested: string[]; overlay: string; warnings: string[] };
    t.same(info.nested, [join(mnt, 'files/p1'), join(mnt, 'files/p2')]);
    t.same(info.warnings, []);

    const data = prng(5)(200_000);
    const gone = manifest.files.find((f) => f.partition === 1)!;
    await writeFile(join(mnt, 'files/p1/added-by-test.bin'), data);
    await writeFile(join(mnt, 'files/p2/added-by-test.bin'), data);
    await unlink(join(mnt, 'files/p1', gone.path));
    t.equal(await sha256File(join(mnt, 'files/p1/added-by-test.bin')), sha(data), 'a file written through fuse2fs reads back');
    t.equal(await sha256File(join(mnt, 'files/p2/added-by-test.bin')), sha(data), 'a file written through ntfs-3g reads back');
    const wrong: string[] = [];
    for (const f of manifest.files) {
      if (f === gone) continue;
      const got = await sha256File(join(mnt, 'files', `p${f.partition}`, f.path)).catch((e: Error) => e.message);
      if (got !== f.sha256) wrong.push(`p${f.partition}/${f.path}`);
    }
    t.same(wrong, [], 'the other files are unchanged');

    // Unmount the nested filesystems only; then third-party readers see their changes in the partition files.
    for (const n of info.nested) {
      t.equal((await tool('umount', [n])).code, 0, `umount ${n}`);
      await noProcessWith(n);
    }
    const cat = await tool('debugfs', ['-R', 'cat /added-by-test.bin', join(mnt, 'partitions/p1.raw')]);
    t.equal(sha(cat.stdout), sha(data), 'debugfs reads the new file from partitions/p1.raw');
    const ls = await tool('debugfs', ['-R', `stat /${gone.path}`, join(mnt, 'partitions/p1.raw')]);
    t.match(ls.stderr, /File not found/, 'and not the deleted one');
    const fsck = await tool('e2fsck', ['-fn', join(mnt, 'partitions/p1.raw')]);
    t.equal(fsck.code, 0, `e2fsck -fn is clean after the read-write mount: ${fsck.stdout.toString().trim().split('\n').pop()}`);
    const ncat = await tool('ntfscat', [join(mnt, 'partitions/p2.raw'), 'added-by-test.bin']);
    t.equal(sha(ncat.stdout), sha(data), 'ntfscat reads the new file from partitions/p2.raw');

    const u = await ik(['umount', mnt]);
    t.equal(u.code, 0, u.stderr);
    await t.rejects(stat(info.overlay), { code: 'ENOENT' }, 'overlay removed');

    // A fresh mount: the writes were discarded.
    const again = await ik(['mount', image, mnt, '--json']);
    t.equal(again.code, 0, again.stderr);
    t.equal(await sha256File(join(mnt, 'disk.raw')), pointSha, 'disk.raw hashes to the disk as captured');
    t.equal(await pwrite(join(mnt, 'disk.raw'), Buffer.alloc(1), 0), 'EROFS', 'a read-only mount refuses writes (EROFS)');
    t.equal((await ik(['umount', mnt])).code, 0);
    t.same(await folderShas(folder), chainBefore, 'no chain file changed');
  });

  await t.test('SIGKILL of a writable server, then umount: overlay file and mounts gone', async (t) => {
    const mnt = join(dir, 'mnt-kill');
    const overlayDir = join(dir, 'overlays-kill');
    await mkdir(mnt);
    await mkdir(overlayDir);
    const r = await ik(['mount', image, mnt, '--writable', '--files', '--overlay-dir', overlayDir, '--json']);
    t.equal(r.code, 0, r.stderr);
    const { pid, overlay, nested } = JSON.parse(r.stdout) as { pid: number; overlay: string; nested: string[] };
    t.equal(nested.length, 2);
    t.equal(await pwrite(join(mnt, 'disk.raw'), prng(7)(100_000), 100_000), 100_000);
    await writeFile(join(mnt, 'files/p1/before-kill.bin'), prng(8)(50_000));
    t.ok((await stat(overlay)).isFile(), 'the overlay holds the writes');
    process.kill(pid, 'SIGKILL');
    await sleep(300);
    const ls = JSON.parse((await ik(['mounts', '--json'])).stdout) as { state: string; overlay?: string }[];
    t.same(ls.map((m) => [m.state, m.overlay]), [['server gone', overlay]], 'mounts shows the dead server and its overlay');
    const u = await ik(['umount', mnt]);
    t.equal(u.code, 0, u.stderr);
    t.same(await readdir(overlayDir), [], 'umount removed the overlay the dead server left');
    t.same(await ourMounts(dir), [], 'nothing left in /proc/mounts');
    t.same(await folderShas(folder), chainBefore, 'no chain file changed');
  });

  await rm(join(dir, 'expected.img'), { force: true });
});
