// Proves `qp` of the newest image of a 12-incremental chain prints its 13 file names, newest first, and nothing else; --json adds detail.
import t from 'tap';
import { join } from 'node:path';
import { imagekeep, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

t.test('qp of a 13-file chain', async (t) => {
  const { dir, cleanup } = await tempDir('qp');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  await makeRawDisk(src, 4 * 2 ** 20, 11, 2 ** 20);
  for (let i = 0; i <= 12; i++) {
    if (i > 0) await scribble(src, 50 + i, 2, 10_000);
    const r = await imagekeep(['backup', src, folder, '--volume', 'D_VOL', '--at', `2026-04-0${1 + Math.floor(i / 6)}T${String(i % 6 + 10)}:00:00Z`]);
    t.equal(r.code, 0, r.stderr);
  }
  const r = await imagekeep(['qp', join(folder, 'D_VOL-b001-i012.spi')]);
  t.equal(r.code, 0);
  const expected = [...Array.from({ length: 12 }, (_, k) => `D_VOL-b001-i${String(12 - k).padStart(3, '0')}.spi`), 'D_VOL-b001.spf'];
  t.equal(r.stdout, expected.join('\n') + '\n', 'exactly the 13 names, newest first');
  t.equal(r.stderr, '');
  const j = await imagekeep(['qp', join(folder, 'D_VOL-b001-i012.spi'), '--json']);
  const parsed = JSON.parse(j.stdout) as { name: string; first: number; last: number; pointTime: string }[];
  t.same(parsed.map((p) => p.name), expected);
  t.equal(parsed[0]!.pointTime, '2026-04-03T10:00:00.000Z');
});
