// Proves that a folder built like the SPEC §4 example (real images made with --at, collapsed by process --now) gives exactly the spec's qp path.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../src/chain/backup.js';
import { resolvePolicySettings } from '../src/chain/policy/settings.js';
import { processFolder } from '../src/chain/process.js';
import { imagekeep, tempDir } from './helpers/cli.js';

const DAY = 86_400_000;
/** Points per business day, from the day after the base: the counts that give the spec's numbers. */
function schedule(): { day: string; count: number }[] {
  const spread = (from: string, days: number, total: number) =>
    Array.from({ length: days }, (_, i) => ({
      day: new Date(Date.parse(from) + i * DAY).toISOString().slice(0, 10),
      count: Math.floor(total / days) + (i < total % days ? 1 : 0),
    }));
  return [
    ...spread('2026-06-20', 11, 42), // month end Tue 06-30: i042-cd-cm
    ...spread('2026-07-01', 31, 180), // Fri 07-31: i222-cd-cm
    ...spread('2026-08-01', 31, 185), // Mon 08-31: i407-cd-cm
    ...spread('2026-09-01', 30, 186), // Wed 09-30: i593-cd-cm
    ...spread('2026-10-01', 3, 27), // Thu..Sat 10-03: i620-cd-cw
    { day: '2026-10-04', count: 4 }, // i624-cd
    { day: '2026-10-05', count: 6 }, // i630-cd
    { day: '2026-10-06', count: 3 }, // today: i631..i633
  ];
}

t.test('the SPEC §4 example, built for real', async (t) => {
  const { dir, cleanup } = await tempDir('spec4', '/dev/shm');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'C_VOL');
  const disk = Buffer.alloc(32 * 4096);
  const write = async () => {
    randomBytes(4096).copy(disk, 4096 * (Math.floor(Math.random() * 32)));
    const h = await open(src, 'w');
    await h.write(disk, 0, disk.length, 0);
    await h.close();
  };
  const settings = resolvePolicySettings({ timeZone: 'UTC' });
  const opts = { forensic: true, workers: 0, blockSize: 4096 };
  await write();
  await backup(src, folder, { ...opts, at: Date.parse('2026-06-19T10:00:00Z') }); // b001: an older chain
  await backup(src, folder, { ...opts, full: true, at: Date.parse('2026-06-19T12:00:00Z') }); // b002
  let points = 0;
  for (const { day, count } of schedule()) {
    const midnight = Date.parse(`${day}T00:00:00Z`);
    const r = await processFolder(folder, settings, { now: midnight + 5 * 60_000 });
    t.ok(r.ok, `process on ${day} 00:05`) || t.comment(JSON.stringify(r.actions.filter((a) => a.error)));
    for (let k = 0; k < count; k++) {
      await write();
      await backup(src, folder, { ...opts, at: midnight + 3_600_000 + k * Math.floor(22 * 3_600_000 / count) });
      points++;
    }
  }
  t.equal(points, 633);
  const qp = await imagekeep(['qp', join(folder, 'C_VOL-b002-i633.spi')]);
  t.equal(qp.stdout, [
    'C_VOL-b002-i633.spi', 'C_VOL-b002-i632.spi', 'C_VOL-b002-i631.spi', 'C_VOL-b002-i630-cd.spi', 'C_VOL-b002-i624-cd.spi',
    'C_VOL-b002-i620-cd-cw.spi', 'C_VOL-b002-i593-cd-cm.spi', 'C_VOL-b002-i407-cd-cm.spi', 'C_VOL-b002-i222-cd-cm.spi',
    'C_VOL-b002-i042-cd-cm.spi', 'C_VOL-b002.spf',
  ].join('\n') + '\n', 'qp prints exactly the spec\'s path');
  t.equal(qp.stderr, '');
});
