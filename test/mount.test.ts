// Proves mount through real FUSE (+ ntfs-3g, fuse2fs): a middle point's files and disk.raw match what was captured, GPT and MBR-logical partitions are right, two mounts serve eight concurrent readers, umount (also after SIGKILL) leaves nothing, test-restore passes and fails by volume, corruption fails before mounting or reads as EIO.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { copyFile, mkdir, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeDisk, type Manifest } from '../src/devkit/index.js';
import { backup } from '../src/chain/backup.js';
import { ImageFile, KeyRing } from '../src/chain/image/reader.js';
import { sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { MiB, mountCommandLine, ourMounts, runNode, sha256Range, unmountLeftovers } from './helpers/mount.js';

/** Every file of `manifest` read through files/pN of `mnt` (async reads: the server is another process). */
async function checkFiles(t: Test, mnt: string, manifest: Manifest, partitions: number[]): Promise<void> {
  let same = 0;
  const bad: string[] = [];
  for (const f of manifest.files.filter((x) => partitions.includes(x.partition))) {
    const got = await sha256File(join(mnt, 'files', `p${f.partition}`, f.path)).catch((e: Error) => e.message);
    if (got === f.sha256) same++;
    else bad.push(`p${f.partition}/${f.path}: ${got}`);
  }
  t.same(bad, [], `${same} files under files/p${partitions.join(', files/p')} have the sha256 recorded at capture`);
}

// The reader run by eight processes: random ranges of disk.raw in two mounts, sha256 of each.
const READER = `
const { open } = require('node:fs/promises');
const { createHash } = require('node:crypto');
const [files, seed, size] = [process.argv[1].split(','), Number(process.argv[2]), Number(process.argv[3])];
let x = seed;
const rnd = (n) => { x = (x * 1103515245 + 12345) % 2147483648; return x % n; };
(async () => {
  const out = [];
  for (const path of files) {
    const f = await open(path, 'r');
    for (let i = 0; i < 40; i++) {
      const length = 1 + rnd(300000);
      const offset = rnd(size - length);
      const buf = Buffer.alloc(length);
      const { bytesRead } = await f.read(buf, 0, length, offset);
      out.push({ path, offset, length, bytesRead, sha: createHash('sha256').update(buf).digest('hex') });
    }
    await f.close();
  }
  console.log(JSON.stringify(out));
})();
`;

t.test('mount', async (t) => {
  const { dir, cleanup } = await tempDir('mount');
  const run = join(dir, 'run');
  const env = { IMAGEKEEP_RUN_DIR: run };
  const { cli, note } = await mountCommandLine(dir);
  t.comment(`imagekeep: ${note}`);
  const ik = (args: string[]): Promise<RunResult> => runNode([cli, ...args], env);
  t.teardown(async () => {
    // Whatever a failed assertion left mounted: nested first, lazily.
    await unmountLeftovers(dir);
    await cleanup();
  });

  // A GPT disk (NTFS p1, ext4 p2) with three points; the disk is kept as it was at each.
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 256 * MiB, seed: 5, tmpDir: dir, bytes: 24 * MiB });
  t.teardown(() => disk.cleanup());
  const folder = join(dir, 'backups');
  const points: { image: string; sha: string; manifest: Manifest; copy: string; at: number }[] = [];
  const start = Date.parse('2026-05-01T08:00:00Z');
  for (let n = 0; n < 3; n++) {
    if (n > 0) await disk.mutate({ seed: 70 + n, create: 6, modify: 6, remove: 3, bytes: 6 * MiB });
    const copy = join(dir, `point-${n}.img`);
    await new Promise((r) => spawn('cp', ['--sparse=always', disk.path, copy]).on('close', r));
    const r = await backup(disk.path, folder, { forensic: true, workers: 0, at: start + n * 3600_000 });
    points.push({ image: r.path, sha: await disk.hash(), manifest: await disk.manifest(), copy, at: start + n * 3600_000 });
  }
  const mid = points[1]!;

  await t.test('a middle point of a folder, by time, with --files', async (t) => {
    const mnt = join(dir, 'mnt-mid');
    await mkdir(mnt);
    const r = await ik(['mount', folder, mnt, '--at', new Date(mid.at + 1800_000).toISOString(), '--files', '--json']);
    t.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout) as { image: string; nested: string[]; view: { volumes: { name: string; fs: string; offset: number; length: number }[] } };
    t.equal(info.image, mid.image, 'the newest point at or before --at is mounted');
    t.same(info.nested, [join(mnt, 'files/p1'), join(mnt, 'files/p2')], 'NTFS and ext4 mounted on files/p1, files/p2');
    t.same(info.view.volumes.map((v) => [v.name, v.fs, v.offset, v.length]),
      disk.layout.partitions.map((p) => [`p${p.number}`, p.fs === 'ext4' ? 'ext' : p.fs, p.offset, p.length]), 'GPT partitions: numbers, offsets, sizes');
    t.equal(await sha256File(join(mnt, 'disk.raw')), mid.sha, 'disk.raw hashes to the disk as captured (--forensic)');
    for (const p of disk.layout.partitions) {
      t.equal(await sha256File(join(mnt, `partitions/p${p.number}.raw`)), await sha256Range(mid.copy, p.offset, p.length), `partitions/p${p.number}.raw is its byte range of the disk`);
    }
    await checkFiles(t, mnt, mid.manifest, [1, 2]);
    t.not(points[2]!.manifest.files.length === mid.manifest.files.length && JSON.stringify(points[2]!.manifest) === JSON.stringify(mid.manifest), true, 'the later point differs');
    const ls = await ik(['mounts', '--json']);
    t.same((JSON.parse(ls.stdout) as { dir: string; state: string }[]).map((m) => [m.dir, m.state]), [[mnt, 'mounted']], 'mounts lists it');

    // A second point at once, and eight processes reading random ranges of both disk.raw files.
    const mnt2 = join(dir, 'mnt-last');
    await mkdir(mnt2);
    const r2 = await ik(['mount', points[2]!.image, mnt2]);
    t.equal(r2.code, 0, r2.stderr);
    const readers = await Promise.all(Array.from({ length: 8 }, (_, i) =>
      runNode(['-e', READER, [join(mnt, 'disk.raw'), join(mnt2, 'disk.raw')].join(','), String(1000 + i), String(256 * MiB)], {})));
    let checked = 0;
    const wrong: string[] = [];
    for (const rr of readers) {
      t.equal(rr.code, 0, rr.stderr);
      for (const c of JSON.parse(rr.stdout) as { path: string; offset: number; length: number; bytesRead: number; sha: string }[]) {
        const ref = c.path.startsWith(mnt2) ? points[2]!.copy : mid.copy;
        if (c.bytesRead !== c.length || c.sha !== (await sha256Range(ref, c.offset, c.length))) wrong.push(`${c.path}@${c.offset}+${c.length}`);
        checked++;
      }
    }
    t.same(wrong, [], `${checked} random ranges read by 8 concurrent processes from two mounts are right`);

    for (const m of [mnt, mnt2]) {
      const u = await ik(['umount', m]);
      t.equal(u.code, 0, u.stderr);
    }
    t.same(await ourMounts(dir), [], 'after umount, /proc/mounts holds nothing of ours');
    t.match((await ik(['mounts'])).stdout, /nothing mounted/);
  });

  await t.test('SIGKILL of the server, then umount', async (t) => {
    const mnt = join(dir, 'mnt-kill');
    await mkdir(mnt);
    const r = await ik(['mount', points[0]!.image, mnt, '--files', '--json']);
    t.equal(r.code, 0, r.stderr);
    const { pid } = JSON.parse(r.stdout) as { pid: number };
    process.kill(pid, 'SIGKILL');
    await new Promise((res) => setTimeout(res, 300));
    t.equal((JSON.parse((await ik(['mounts', '--json'])).stdout) as { state: string }[])[0]?.state, 'server gone', 'mounts shows the dead server');
    const u = await ik(['umount', mnt]);
    t.equal(u.code, 0, u.stderr);
    t.same(await ourMounts(dir), [], 'nothing left in /proc/mounts');
  });

  await t.test('test-restore passes on the clean chain', async (t) => {
    const r = await ik(['test-restore', mid.image, '--json']);
    t.equal(r.code, 0, r.stderr);
    const rep = JSON.parse(r.stdout) as { ok: boolean; volumes: { name: string; fs: string; ok: boolean; files?: number; checks: { tool: string }[] }[] };
    t.ok(rep.ok);
    t.same(rep.volumes.map((v) => [v.name, v.fs, v.ok]), [['p1', 'ntfs', true], ['p2', 'ext', true]]);
    t.equal(rep.volumes[0]!.files, mid.manifest.files.filter((f) => f.partition === 1).length, 'every NTFS file was read');
    t.same(await ourMounts(dir), [], 'test-restore unmounted');
  });

  await t.test('test-restore fails, naming the volume, on a disk whose ext4 metadata was damaged', async (t) => {
    const bad = await makeDisk({ path: join(dir, 'bad.img'), size: 128 * MiB, seed: 8, tmpDir: dir, bytes: 4 * MiB });
    t.teardown(() => bad.cleanup());
    await bad.damageExtMetadata(2);
    const r0 = await backup(bad.path, join(dir, 'bad-backups'), { forensic: true, workers: 0 });
    const r = await ik(['test-restore', r0.path]);
    t.equal(r.code, 1, 'exit status 1');
    t.match(r.stdout, /OK {4}\s*p1 \(ntfs/, 'the NTFS volume passes');
    t.match(r.stdout, /FAILED\s+p2 \(ext/, 'the ext volume fails');
    t.match(r.stderr, /^imagekeep: test-restore of .* failed: volume p2 \(ext\): e2fsck -fn exit \d+/);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one error line');
    t.same(await ourMounts(dir), []);
  });

  await t.test('corruption: refused before mounting; a bad block reads as EIO and is logged', async (t) => {
    const bent = join(dir, 'bent');
    await mkdir(bent);
    for (const p of points.slice(0, 2)) await copyFile(p.image, join(bent, p.image.split('/').pop()!));
    const base = join(bent, 'C_VOL-b001.spf');
    const inc = join(bent, 'C_VOL-b001-i001.spi');
    // A flipped byte in the base's header: the whole path is checked, so mounting the incremental fails.
    const f = await open(base, 'r+');
    const one = Buffer.alloc(1);
    await f.read(one, 0, 1, 100);
    await f.write(Buffer.from([one[0]! ^ 0xff]), 0, 1, 100);
    const mnt = join(dir, 'mnt-bent');
    await mkdir(mnt);
    let r = await ik(['mount', inc, mnt]);
    t.equal(r.code, 1, 'mount fails');
    t.match(r.stderr, /^imagekeep: C_VOL-b001\.spf: header checksum mismatch/);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
    t.same(await ourMounts(dir), [], 'nothing was mounted');
    await f.write(one, 0, 1, 100);

    // A flipped byte inside one stored block of the incremental: found only when read.
    const im = await ImageFile.open(inc, new KeyRing(null));
    let pos = Math.floor(im.index.count / 2);
    while (im.isZero(pos) || im.index.storedLengths[pos]! < 64) pos++;
    const block = im.index.blocks[pos]!;
    const at = im.index.offsets[pos]! + Math.floor(im.index.storedLengths[pos]! / 2);
    const blockSize = im.header.blockSize;
    await im.close();
    await f.close();
    const g = await open(inc, 'r+');
    await g.read(one, 0, 1, at);
    await g.write(Buffer.from([one[0]! ^ 0x5a]), 0, 1, at);
    await g.close();
    r = await ik(['mount', inc, mnt, '--json']);
    t.equal(r.code, 0, r.stderr);
    const { log } = JSON.parse(r.stdout) as { log: string };
    const dd = (skip: number) => new Promise<{ code: number; err: string }>((res) => {
      const p = spawn('dd', [`if=${join(mnt, 'disk.raw')}`, 'of=/dev/null', `bs=${blockSize}`, `skip=${skip}`, 'count=1', 'status=none']);
      let err = '';
      p.stderr.on('data', (d) => (err += d));
      p.on('close', (code) => res({ code: code ?? 1, err }));
    });
    const bad = await dd(block);
    t.not(bad.code, 0, 'reading the damaged block fails');
    t.match(bad.err, /Input\/output error/, 'with EIO');
    const fine = await dd(block > 8 ? block - 8 : block + 8);
    t.equal(fine.code, 0, 'another block still reads');
    t.match(await readFile(log, 'utf8'), new RegExp(`C_VOL-b001-i001\\.spi: block ${block} (fails its checksum|does not decompress)`), 'the log names image and block');
    t.equal((await ik(['umount', mnt])).code, 0);
    t.same(await ourMounts(dir), []);
  });
});

t.test('MBR with logical partitions: numbering and offsets', async (t) => {
  const { dir, cleanup } = await tempDir('mount-mbr');
  const env = { IMAGEKEEP_RUN_DIR: join(dir, 'run') };
  const { cli } = await mountCommandLine(dir);
  const ik = (args: string[]): Promise<RunResult> => runNode([cli, ...args], env);
  t.teardown(async () => {
    await unmountLeftovers(dir);
    await cleanup();
  });
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 256 * MiB, scheme: 'mbr', logical: true, seed: 11, tmpDir: dir, bytes: 4 * MiB });
  t.teardown(() => disk.cleanup());
  const manifest = await disk.manifest();
  const r0 = await backup(disk.path, join(dir, 'backups'), { forensic: true, workers: 0 });
  const mnt = join(dir, 'mnt');
  await mkdir(mnt);
  const r = await ik(['mount', r0.path, mnt, '--files', '--json']);
  t.teardown(() => ik(['umount', mnt]));
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr, '', 'no warnings: every volume mounted');
  const info = JSON.parse(r.stdout) as { nested: string[]; view: { scheme: string; volumes: { name: string; fs: string; offset: number; length: number }[] } };
  t.equal(info.view.scheme, 'mbr');
  t.same(info.nested, ['p1', 'p2', 'p5', 'p6'].map((n) => join(mnt, 'files', n)), 'NTFS, ext4, ext4 and FAT (fusefat) mounted');
  t.same(info.view.volumes.map((v) => [v.name, v.offset, v.length]), disk.layout.partitions.map((p) => [`p${p.number}`, p.offset, p.length]),
    `partitions ${disk.layout.partitions.map((p) => `p${p.number}`).join(', ')} (the extended container left out), offsets and sizes as sfdisk made them`);
  t.same(info.view.volumes.map((v) => v.name), ['p1', 'p2', 'p5', 'p6']);
  for (const p of disk.layout.partitions) {
    t.equal(await sha256File(join(mnt, `partitions/p${p.number}.raw`)), await sha256Range(disk.path, p.offset, p.length), `partitions/p${p.number}.raw is bytes ${p.offset}.. of the disk`);
  }
  await checkFiles(t, mnt, manifest, [1, 2, 5, 6]);
  const u = await ik(['umount', mnt]);
  t.equal(u.code, 0, u.stderr);
  t.same(await ourMounts(dir), []);
});
