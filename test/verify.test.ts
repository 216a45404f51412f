// Proves verification: quick catches a flipped byte, deep catches it even after the .md5 was regenerated, .bad.log lists and clears, --repair only for a sound image.
import t from 'tap';
import { execFile } from 'node:child_process';
import { open, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { imagekeep, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

const run = promisify(execFile);

async function flip(path: string, at: number): Promise<void> {
  const h = await open(path, 'r+');
  const b = Buffer.alloc(1);
  await h.read(b, 0, 1, at);
  b[0] ^= 0x01;
  await h.write(b, 0, 1, at);
  await h.close();
}

async function regenerateMd5(folder: string, name: string): Promise<void> {
  const { stdout } = await run('md5sum', [name], { cwd: folder });
  await writeFile(join(folder, name.replace(/\.sp[fi]$/, '.md5')), stdout);
}

t.test('verification', async (t) => {
  const { dir, cleanup } = await tempDir('verify');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 8 * 2 ** 20, 41, 3 * 2 ** 20);
  for (let i = 0; i < 4; i++) {
    if (i > 0) await scribble(src, 400 + i, 3, 40_000);
    t.equal((await imagekeep(['backup', src, folder, '--at', `2026-08-01T0${i}:00:00Z`])).code, 0);
  }
  const ok = await imagekeep(['verify', folder, '--deep', '--json']);
  t.equal(ok.code, 0, 'a sound folder verifies');
  t.equal(JSON.parse(ok.stdout).checked.length, 4);

  const i1 = 'C_VOL-b001-i001.spi';
  await flip(join(folder, i1), 4096 + 10);
  const quick = await imagekeep(['verify', folder]);
  t.equal(quick.code, 1, 'quick verify fails');
  t.match(quick.stdout, new RegExp(`FAILED  ${i1}: MD5 [0-9a-f]+ does not match its .md5`));
  const bad = await readFile(join(folder, 'C_VOL-b001.bad.log'), 'utf8');
  t.match(bad, new RegExp(`^${i1}\\tMD5 `), '.bad.log names the file and why');
  t.equal(bad.trim().split('\n').length, 1, 'and only that file');

  const refused = await imagekeep(['backup', src, folder, '--at', '2026-08-01T09:00:00Z']);
  t.equal(refused.code, 1, 'a backup through the bad file is refused');
  t.match(refused.stderr, /C_VOL-b001-i001.spi failed verification/);

  await regenerateMd5(folder, i1);
  t.equal((await imagekeep(['verify', folder])).code, 0, 'quick verify passes once the .md5 matches the damaged bytes');
  await t.rejects(stat(join(folder, 'C_VOL-b001.bad.log')), '.bad.log removed when the files verify good');
  const deep = await imagekeep(['verify', folder, '--deep']);
  t.equal(deep.code, 1, 'deep verify still fails');
  t.match(deep.stdout, new RegExp(`FAILED  ${i1}: block \\d+ (fails its checksum|does not decompress)`));
  t.match(await readFile(join(folder, 'C_VOL-b001.bad.log'), 'utf8'), new RegExp(`^${i1}\\tblock \\d+`));

  t.test('--repair re-creates a missing .md5 only for a sound image', async (t) => {
    await unlink(join(folder, 'C_VOL-b001-i002.md5'));
    await unlink(join(folder, 'C_VOL-b001-i001.md5'));
    const r = await imagekeep(['verify', folder, '--deep', '--repair']);
    t.equal(r.code, 1, 'the damaged image still fails');
    t.match(r.stdout, /REPAIRED  C_VOL-b001-i002.spi/);
    t.match(r.stdout, /FAILED  C_VOL-b001-i001.spi: block/);
    await stat(join(folder, 'C_VOL-b001-i002.md5'));
    await t.rejects(stat(join(folder, 'C_VOL-b001-i001.md5')), 'no .md5 made for the damaged image');
    const { stdout } = await run('md5sum', ['-c', 'C_VOL-b001-i002.md5'], { cwd: folder });
    t.match(stdout, /C_VOL-b001-i002.spi: OK/, 'the re-created .md5 satisfies md5sum -c');
    t.equal((await imagekeep(['verify', folder, '--repair'])).code, 2, '--repair without --deep is a usage error');
  });

  t.test('a damaged chain does not block a new base and its incrementals', async (t) => {
    // A new base starts a new chain with its own .bad.log; the old chain's bad file is not on its path.
    const r = await imagekeep(['backup', src, folder, '--full', '--at', '2026-08-02T00:00:00Z']);
    t.equal(r.code, 0, r.stderr);
    t.notMatch(r.stderr, /failed verification/, 'nothing about the other chain');
    await scribble(src, 499, 2, 10_000);
    const inc = await imagekeep(['backup', src, folder, '--at', '2026-08-02T01:00:00Z']);
    t.equal(inc.code, 0, inc.stderr);
    await rm(join(folder, 'C_VOL-b001.bad.log'));
  });
});
