// Proves the backup options: --changed-blocks reads only the listed ranges, --pre/--post run around the read, a .bad.log on the path refuses, several volumes share a folder.
import t from 'tap';
import { readFile, writeFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { hostname } from 'node:os';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

t.test('backup options', async (t) => {
  const { dir, cleanup } = await tempDir('opts');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 8 * 2 ** 20, 21, 2 * 2 ** 20);
  t.equal((await imagekeep(['backup', src, folder, '--at', '2026-07-01T00:00:00Z'])).code, 0);

  t.test('--changed-blocks reads only the listed ranges', async (t) => {
    const listed = await scribble(src, 22, 3, 30_000);
    const list = join(dir, 'cbt.txt');
    await writeFile(list, '# offset length\n' + listed.map((e) => `${e.offset} ${e.length}`).join('\n') + '\n');
    const withList = await sha256File(src);
    await t.resolves(imagekeep(['backup', src, folder, '--changed-blocks', list, '--at', '2026-07-01T01:00:00Z']));
    const out = join(dir, 'p1.raw');
    t.equal((await imagekeep(['export', join(folder, 'C_VOL-b001-i001.spi'), out])).code, 0);
    t.equal(await sha256File(out), withList, 'the listed changes are in the point');
    // A change the list does not name is not read: proof that only listed blocks are read.
    const unlisted = await scribble(src, 23, 1, 1000);
    const list2 = join(dir, 'cbt2.txt');
    await writeFile(list2, `${listed[0]!.offset} 1\n`);
    t.equal((await imagekeep(['backup', src, folder, '--changed-blocks', list2, '--at', '2026-07-01T02:00:00Z'])).code, 0);
    const out2 = join(dir, 'p2.raw');
    t.equal((await imagekeep(['export', join(folder, 'C_VOL-b001-i002.spi'), out2])).code, 0);
    t.equal(await sha256File(out2), withList, `the unlisted change at ${unlisted[0]!.offset} was not read`);
    await writeFile(list2, 'twelve bytes\n');
    const bad = await imagekeep(['backup', src, folder, '--changed-blocks', list2]);
    t.equal(bad.code, 2);
    t.match(bad.stderr, /line 1: "twelve bytes" is not "OFFSET LENGTH"/);
  });

  t.test('--pre and --post', async (t) => {
    const log = join(dir, 'hooks.log');
    const r = await imagekeep(['backup', src, folder, '--at', '2026-07-01T03:00:00Z', '--pre', `echo pre >> ${log}`, '--post', `echo post >> ${log}`]);
    t.equal(r.code, 0, r.stderr);
    t.equal(await readFile(log, 'utf8'), 'pre\npost\n');
    const failing = await imagekeep(['backup', src, folder, '--at', '2026-07-01T04:00:00Z', '--pre', 'echo frozen-fail >&2; exit 3', '--post', `echo post2 >> ${log}`]);
    t.equal(failing.code, 1);
    t.match(failing.stderr, /--pre command failed \(exit 3\): frozen-fail/);
    t.equal(await readFile(log, 'utf8'), 'pre\npost\npost2\n', 'post runs even when the backup fails');
    await t.rejects(stat(join(folder, 'C_VOL-b001-i004.spi')), 'no image from the failed run');
  });

  t.test('.bad.log', async (t) => {
    const badLog = join(folder, 'C_VOL-b001.bad.log');
    await writeFile(badLog, 'C_VOL-b001-i002.spi\tdeep verify: block 7 fails its checksum\n');
    const r = await imagekeep(['backup', src, folder, '--at', '2026-07-01T05:00:00Z']);
    t.equal(r.code, 1);
    t.match(r.stderr, /C_VOL-b001-i002.spi failed verification \(listed in C_VOL-b001.bad.log\)/);
    await writeFile(badLog, 'C_VOL-b001-i999.spi\tmissing\n');
    const ok = await imagekeep(['backup', src, folder, '--at', '2026-07-01T05:00:00Z']);
    t.equal(ok.code, 0, 'a bad file off the path only warns');
    t.match(ok.stderr, /warning: C_VOL-b001-i999.spi failed verification but is not on the path/);
  });

  t.test('the folder lock, and --at as the mtime', async (t) => {
    const lock = join(folder, '.imagekeep.lock');
    await writeFile(lock, `${process.pid} ${hostname()} backup of something else\n`);
    const r = await imagekeep(['backup', src, folder, '--at', '2026-07-01T05:30:00Z']);
    t.equal(r.code, 1);
    t.match(r.stderr, new RegExp(`in use by another imagekeep \\(pid ${process.pid} .*backup of something else\\); wait for it to finish`));
    await writeFile(lock, `999999999 ${hostname()} a killed backup\n`);
    const ok = await imagekeep(['backup', src, folder, '--at', '2026-07-01T05:30:00Z', '--json']);
    t.equal(ok.code, 0, 'a lock left by a dead process is taken over');
    await t.rejects(stat(lock), 'and released');
    t.equal((await stat(JSON.parse(ok.stdout).path)).mtime.toISOString(), '2026-07-01T05:30:00.000Z', 'the image mtime is the --at time');
  });

  t.test('two volumes in one folder, and --json', async (t) => {
    const d = join(dir, 'disk-d.raw');
    await makeRawDisk(d, 4 * 2 ** 20, 31, 2 ** 20);
    const r = await imagekeep(['backup', d, folder, '--volume', 'D_VOL', '--at', '2026-07-01T06:00:00Z', '--json']);
    t.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    t.match(j, { image: 'D_VOL-b001.spf', kind: 'full', volume: 'D_VOL', base: 1, number: 0, sourceBytes: 4 * 2 ** 20 });
    const noVolume = await imagekeep(['backup', src, folder, '--json']);
    t.equal(noVolume.code, 0, noVolume.stderr);
    t.equal(JSON.parse(noVolume.stdout).volume, 'C_VOL', 'without --volume a folder of several volumes uses C_VOL');
    const ls = JSON.parse((await imagekeep(['ls', folder, '--json'])).stdout);
    t.same(ls.chains.map((c: { volume: string }) => c.volume).sort(), ['C_VOL', 'D_VOL']);
    const full = await imagekeep(['backup', d, folder, '--volume', 'D_VOL', '--full', '--at', '2026-07-01T07:00:00Z', '--json']);
    t.equal(JSON.parse(full.stdout).image, 'D_VOL-b002.spf', '--full starts base 2');
  });
});
