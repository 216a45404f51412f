// Proves each bad input of the foundation issue gives one clear line, a non-zero exit, and no file under a final name.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { open, readdir, rm, truncate, unlink, writeFile, mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { imagekeep, prng, sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

const run = promisify(execFile);

function oneLine(t: Test, r: RunResult, pattern: RegExp, what: string) {
  t.not(r.code, 0, `${what}: non-zero exit`);
  const lines = r.stderr.trim().split('\n');
  t.equal(lines.length, 1, `${what}: one line on stderr (${r.stderr.trim()})`);
  t.match(lines[0], pattern, `${what}: says what is wrong`);
}

const finalNames = async (dir: string) => (await readdir(dir)).filter((n) => !n.startsWith('.')).sort();

t.test('bad input', async (t) => {
  const { dir, cleanup } = await tempDir('bad');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 16 * 2 ** 20, 1, 4 * 2 ** 20);
  for (let i = 0; i < 3; i++) {
    if (i > 0) await scribble(src, 100 + i, 4, 70_000);
    t.equal((await imagekeep(['backup', src, folder, '--at', `2026-02-01T0${i}:00:00Z`])).code, 0);
  }
  const base = join(folder, 'C_VOL-b001.spf');
  const i1 = join(folder, 'C_VOL-b001-i001.spi');
  const i2 = join(folder, 'C_VOL-b001-i002.spi');
  const before = await finalNames(folder);
  const out = join(dir, 'out.raw');

  t.test('an --at before the previous point', async (t) => {
    const r = await imagekeep(['backup', src, folder, '--at', '2026-02-01T01:30:00Z']);
    oneLine(t, r, /not after the previous point/, '--at');
    t.same(await finalNames(folder), before);
  });

  t.test('a source whose size changed', async (t) => {
    const grown = join(dir, 'grown.raw');
    await run('cp', ['--sparse=always', src, grown]);
    await truncate(grown, 17 * 2 ** 20);
    const r = await imagekeep(['backup', grown, folder]);
    oneLine(t, r, /source is 17825792 bytes but the chain's disk is 16777216/, 'size changed');
    t.same(await finalNames(folder), before);
  });

  t.test('a foreign file named like an image', async (t) => {
    const fdir = join(dir, 'foreign');
    await mkdir(fdir);
    await writeFile(join(fdir, 'C_VOL-b001.spf'), prng(5)(100_000));
    const r = await imagekeep(['export', join(fdir, 'C_VOL-b001.spf'), out]);
    oneLine(t, r, /not an imagekeep image.*ShadowProtect.*proprietary/, 'foreign');
    const r2 = await imagekeep(['backup', src, fdir]);
    oneLine(t, r2, /not an imagekeep image/, 'backup onto a foreign chain');
    await t.rejects(stat(out));
  });

  t.test('a missing parent', async (t) => {
    const moved = i1 + '.away';
    await run('mv', [i1, moved]);
    t.teardown(() => run('mv', [moved, i1]));
    const r = await imagekeep(['export', i2, out]);
    oneLine(t, r, /ends at incremental 1, and there is none: the chain is broken/, 'missing parent');
    await t.rejects(stat(out));
  });

  t.test('a missing .md5', async (t) => {
    const md5 = join(folder, 'C_VOL-b001-i001.md5');
    const saved = await import('node:fs/promises').then((f) => f.readFile(md5));
    await unlink(md5);
    t.teardown(() => writeFile(md5, saved));
    const r = await imagekeep(['backup', src, folder]);
    oneLine(t, r, /C_VOL-b001-i001.spi has no .md5 sidecar.*verify --deep --repair/, 'missing md5 refuses a backup');
    t.same(await finalNames(folder), before.filter((n) => n !== 'C_VOL-b001-i001.md5'));
    // Recovery still works, with a warning.
    const e = await imagekeep(['export', i2, out]);
    t.equal(e.code, 0, 'export still works');
    t.match(e.stderr, /warning: C_VOL-b001-i001.spi has no .md5/);
    await rm(out);
  });

  t.test('a truncated image', async (t) => {
    const copy = join(dir, 'trunc');
    await run('cp', ['-r', folder, copy]);
    const f = join(copy, 'C_VOL-b001-i002.spi');
    await truncate(f, (await stat(f)).size - 100);
    oneLine(t, await imagekeep(['export', f, out]), /truncated|no index trailer/, 'truncated export');
    await t.rejects(stat(out));
    oneLine(t, await imagekeep(['backup', src, copy]), /truncated|no index trailer/, 'truncated backup');
  });

  t.test('a flipped byte in a block', async (t) => {
    const copy = join(dir, 'flip');
    await run('cp', ['-r', folder, copy]);
    const f = join(copy, 'C_VOL-b001.spf');
    const h = await open(f, 'r+');
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, 4096 + 1000);
    b[0] ^= 0x10;
    await h.write(b, 0, 1, 4096 + 1000);
    await h.close();
    oneLine(t, await imagekeep(['export', f, out]), /C_VOL-b001.spf: block \d+ (fails its checksum|does not decompress)/, 'flipped byte');
    await t.rejects(stat(out));
    t.same((await readdir(dir)).filter((n) => n.startsWith('.imagekeep-tmp')), [], 'no temporary file left');
  });

  t.test('a wrong password', async (t) => {
    const enc = join(dir, 'enc');
    const pw = join(dir, 'pw');
    const wrong = join(dir, 'wrong');
    await writeFile(pw, 'correct horse\n');
    await writeFile(wrong, 'battery staple\n');
    t.equal((await imagekeep(['backup', src, enc, '--password-file', pw, '--at', '2026-03-01T00:00:00Z'])).code, 0);
    await scribble(src, 300, 3, 50_000);
    t.equal((await imagekeep(['backup', src, enc, '--at', '2026-03-01T01:00:00Z'], { IMAGEKEEP_PASSWORD_FILE: pw })).code, 0);
    await stat(join(enc, 'C_VOL-b001.spk'));
    oneLine(t, await imagekeep(['export', join(enc, 'C_VOL-b001-i001.spi'), out, '--password-file', wrong]), /wrong password/, 'wrong password');
    await t.rejects(stat(out));
    oneLine(t, await imagekeep(['export', join(enc, 'C_VOL-b001-i001.spi'), out]), /encrypted: give the password/, 'no password');
    oneLine(t, await imagekeep(['backup', src, enc, '--password-file', wrong]), /wrong password/, 'backup with a wrong password');
    t.equal((await imagekeep(['export', join(enc, 'C_VOL-b001-i001.spi'), out, '--password-file', pw])).code, 0);
    t.equal(await sha256File(out), await sha256File(src), 'the right password reads the point');
    await rm(out);
  });

  t.test('a full destination', async (t) => {
    const small = join(dir, 'small');
    await mkdir(small);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=1M', 'tmpfs', small]);
    t.teardown(() => run('umount', [small]));
    const r = await imagekeep(['backup', src, small, '--compress', 'none']);
    oneLine(t, r, /no space left/, 'ENOSPC');
    t.same(await readdir(small), [], 'nothing left behind');
  });

  t.test('restore onto a mounted file and onto a too-small file', async (t) => {
    const fsimg = join(dir, 'ext.img');
    await run('truncate', ['-s', '16M', fsimg]);
    await run('mkfs.ext4', ['-q', '-F', fsimg]);
    const mnt = join(dir, 'mnt');
    await mkdir(mnt);
    const before = await sha256File(fsimg);
    await run('fuse2fs', ['-o', 'ro', fsimg, mnt]);
    try {
      oneLine(t, await imagekeep(['restore', i2, fsimg]), /in use .*unmount it/, 'mounted target');
    } finally {
      await run('umount', [mnt]);
    }
    t.equal(await sha256File(fsimg), before, 'the mounted file was not touched');
    const tiny = join(dir, 'tiny.img');
    await run('truncate', ['-s', '8M', tiny]);
    oneLine(t, await imagekeep(['restore', i2, tiny]), /holds 8388608 bytes but the point needs 16777216/, 'too small');
    t.equal((await stat(tiny)).size, 8 * 2 ** 20);
    const ok = join(dir, 'ok.img');
    t.equal((await imagekeep(['restore', i2, ok])).code, 0);
    t.equal(await sha256File(ok), await sha256File(join(dir, 'expected-i2.raw')).catch(async () => {
      t.equal((await imagekeep(['export', i2, join(dir, 'expected-i2.raw')])).code, 0);
      return sha256File(join(dir, 'expected-i2.raw'));
    }));
  });
  void base;
});
