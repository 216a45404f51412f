// Proves 120 days of hourly backups processed every night keep every remaining file yielding its point's recorded state, with paths that never drop a level and retention as configured.
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../src/chain/backup.js';
import { groupChains, listFolder, loadChain } from '../src/chain/folder.js';
import { levelRank } from '../src/chain/names.js';
import { PointInTime } from '../src/chain/point.js';
import { dependencyPath, newestFile } from '../src/chain/path.js';
import { dayOf } from '../src/chain/policy/calendar.js';
import { resolvePolicySettings } from '../src/chain/policy/settings.js';
import { processFolder } from '../src/chain/process.js';
import { tempDir } from './helpers/cli.js';

const BLOCK = 4096;
const BLOCKS = 64;
const HOUR = 3_600_000;
const DAY = 24 * HOUR;
const digest = (b: Uint8Array) => createHash('sha256').update(b).digest().subarray(0, 16).toString('hex');
const ZERO_DIGEST = digest(Buffer.alloc(BLOCK));

t.test('120 days of hourly incrementals, processed nightly', async (t) => {
  // fsync is free on tmpfs: thousands of durable commits would otherwise spend minutes waiting on the disk.
  const { dir, cleanup } = await tempDir('sim', '/dev/shm');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const folder = join(dir, 'f');
  const disk = Buffer.alloc(BLOCK * BLOCKS);
  for (let b = 0; b < BLOCKS; b += 3) randomBytes(BLOCK).copy(disk, b * BLOCK);
  const settings = resolvePolicySettings({ timeZone: 'UTC', keepIncrementalDays: 2, keepDailyDays: 7, keepWeeklyWeeks: 3, rollingMonths: 2 });
  /** per point number: digest of every block and of the whole disk, when it was captured */
  const states: { blocks: string[]; whole: string; time: number }[] = [];
  const capture = async (at: number) => {
    const h = await open(src, 'w');
    await h.write(disk, 0, disk.length, 0);
    await h.close();
    await backup(src, folder, { at, forensic: true, workers: 0, blockSize: BLOCK });
    const blocks = Array.from({ length: BLOCKS }, (_, b) => digest(disk.subarray(b * BLOCK, (b + 1) * BLOCK)));
    states.push({ blocks, whole: createHash('sha256').update(disk).digest('hex'), time: at });
  };
  const start = Date.parse('2026-01-01T00:30:00Z');
  await capture(start);
  let problems = 0;
  /** Dependency paths checked block for block, by the identity of their files (see below). */
  const checkedPaths = new Set<string>();
  let opened = 0;
  let unchanged = 0;
  let previousPathRanks: number[] = [];
  for (let day = 0; day < 120; day++) {
    for (let hour = 1; hour < 24; hour++) {
      const n = 1 + ((day * 7 + hour) % 4);
      for (let k = 0; k < n; k++) {
        const b = (day * 131 + hour * 17 + k * 29) % BLOCKS;
        if ((day + hour + k) % 11 === 0) disk.fill(0, b * BLOCK, (b + 1) * BLOCK); // becomes zero
        else randomBytes(BLOCK).copy(disk, b * BLOCK);
      }
      await capture(start + day * DAY + hour * HOUR);
    }
    const now = start + (day + 1) * DAY - 25 * 60_000; // 00:05 the next day
    const r = await processFolder(folder, settings, { now });
    if (!r.ok) { problems++; t.fail(`night ${day + 1}: ${JSON.stringify(r.actions.filter((a) => a.error))}`); }

    const files = (await loadChain(groupChains((await listFolder(folder)).images).get('C_VOL-b001')!)).files;
    // Every remaining file yields its point's state, block for block. What a file yields is a
    // function of the bytes of the files on its dependency path, and those are written once
    // (temporary name, fsync, rename) and never in place: a path whose every file still has the
    // name, inode, size, mtime and ctime (which any write, rename or utimes changes) it had when
    // it was checked on an earlier night yields what it yielded then, so it is not opened again.
    const identity = new Map<string, string>();
    for (const f of files) {
      const st = await stat(f.path, { bigint: true });
      identity.set(f.name, `${f.name}/${st.ino}/${st.size}/${st.mtimeNs}/${st.ctimeNs}`);
    }
    for (const f of files) {
      const path = dependencyPath(f, files);
      const key = path.map((p) => identity.get(p.name)).join(' ');
      // A sample read in full: the newest file and one other, every night.
      const sample = f === newestFile(files) || f === files[day % files.length];
      if (!sample && checkedPaths.has(key)) { unchanged++; continue; }
      opened++;
      const point = await PointInTime.open(path.map((p) => p.path));
      try {
        const want = states[f.last]!.blocks;
        let same = true;
        for (let b = 0; b < BLOCKS; b++) {
          const loc = point.locate(b);
          const got = loc ? Buffer.from(loc.image.digestAt(loc.pos)).toString('hex') : ZERO_DIGEST;
          if (got !== want[b]) { same = false; problems++; t.fail(`night ${day + 1}: ${f.name} block ${b} is not the state of point ${f.last}`); break; }
        }
        if (same) checkedPaths.add(key);
        if (sample) {
          const all = Buffer.alloc(point.size);
          await point.read(all, 0);
          if (createHash('sha256').update(all).digest('hex') !== states[f.last]!.whole) { problems++; t.fail(`night ${day + 1}: ${f.name} reads wrong data`); }
        }
      } finally {
        await point.close();
      }
    }
    // The newest point's path never drops back down a level, and stays short.
    const newest = newestFile(files)!;
    const path = dependencyPath(newest, files);
    const ranks = path.slice(0, -1).map((f) => levelRank(f.levelBits));
    for (let i = 1; i < ranks.length; i++) if (ranks[i]! < ranks[i - 1]!) { problems++; t.fail(`night ${day + 1}: path drops a level: ${path.map((p) => p.name).join(' ')}`); }
    const count = (rank: number) => ranks.filter((r) => r === rank).length;
    if (count(0) > 0 || count(1) > 7 || count(2) > 6 || count(3) > settings.rollingMonths + 1 || count(4) > 1) {
      problems++;
      t.fail(`night ${day + 1}: path holds more than the rules allow: ${path.map((p) => p.name).join(' ')}`);
    }
    // Retention: a file past its keep time remains only if a remaining file depends on it.
    const today = dayOf(now, 'UTC');
    const needed = new Set<string>();
    for (const f of files) for (const p of dependencyPath(f, files).slice(1)) needed.add(p.name);
    for (const f of files) {
      const age = (Date.parse(today) - Date.parse(dayOf(f.header.pointTime, 'UTC'))) / DAY;
      const keep = [settings.keepIncrementalDays, settings.keepDailyDays, settings.keepWeeklyWeeks * 7][levelRank(f.levelBits)];
      if (f.last > 0 && keep !== undefined && age > keep && !needed.has(f.name)) {
        problems++;
        t.fail(`night ${day + 1}: ${f.name} (${age} days old) outlived its retention of ${keep} days`);
      }
    }
    previousPathRanks = ranks;
  }
  void previousPathRanks;
  t.equal(problems, 0, `120 nights, ${states.length} points: every check held (${opened} points opened, ${unchanged} on unchanged paths)`);
  const final = (await listFolder(folder)).images.map((i) => i.name);
  t.ok(final.some((n) => n.endsWith('-cr.spi')), 'monthlies were rolled into a -cr');
  t.ok(final.length < 100, `the folder holds ${final.length} files after ${states.length} backups`);
});
