// Proves process over a config file: folders taken in priority, then alphabetical order; settings layered defaults < config defaults < folder entry < the folder's imagekeep.json < flags; one folder's failure reported in one line while the others still run; and the free-space check refusing a collapse that does not fit, losing nothing, until room is made.
import t from 'tap';
import { execFile } from 'node:child_process';
import { cp, mkdir, readdir, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { loadProcessConfig } from '../src/chain/config.js';
import { FolderLock } from '../src/chain/lock.js';
import { defaultPolicySettings } from '../src/chain/policy/settings.js';
import { imagekeep, tempDir } from './helpers/cli.js';
import { twoDayChain } from './helpers/rawdisk.js';

const run = promisify(execFile);
const NOW = '2026-10-03T00:05:00Z';
/** What the night makes of the template chain (two past days, three points each). */
const DAILIES = ['C_VOL-b001-i002-cd.spi', 'C_VOL-b001-i005-cd.spi'];

/** Images and sidecars with their sizes and mtimes: what a refused night must leave as it was. */
async function images(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const n of (await readdir(dir)).sort()) {
    if (!/\.(sp[fi]|md5)$/.test(n)) continue;
    const st = await stat(join(dir, n));
    out.push(`${n} ${st.size} ${st.mtimeMs}`);
  }
  return out;
}

t.test('process with a config file', async (t) => {
  const { dir, cleanup } = await tempDir('process-config', '/dev/shm');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const template = join(dir, 'template');
  await twoDayChain(src, template, 71);
  const folder = async (name: string) => {
    const path = join(dir, name);
    await cp(template, path, { recursive: true });
    return path;
  };

  t.test('settings are layered: defaults < config defaults < folder entry < imagekeep.json < flags', async (t) => {
    const x = await folder('layers-x');
    const y = await folder('layers-y');
    const cfg = join(dir, 'layers.json');
    await writeFile(cfg, JSON.stringify({ defaults: { keepDailyDays: 10 }, folders: [{ path: x, settings: { keepDailyDays: 20 } }, { path: y }] }));
    const days = async (paths: string[], flags: Record<string, unknown> = {}, file: string | null = cfg) =>
      (await loadProcessConfig(paths, file ?? undefined, flags)).folders.map((f) => f.settings.keepDailyDays);
    t.same(await days([x]), [20], 'the folder entry over the config defaults');
    t.same(await days([y]), [10], 'the config defaults for a folder without settings of its own');
    t.same(await days([x], {}, null), [defaultPolicySettings().keepDailyDays], 'the built-in default without a config');
    await writeFile(join(x, 'imagekeep.json'), JSON.stringify({ settings: { keepDailyDays: 30 } }));
    t.same(await days([x]), [30], "the folder's imagekeep.json over its entry");
    t.same(await days([x], { keepDailyDays: '40' }), [40], 'a flag over everything');
    await writeFile(cfg, JSON.stringify({ concurrency: 0, folders: [{ path: x }] }));
    await t.rejects(loadProcessConfig([], cfg, {}), /"concurrency" must be a whole number >= 1/);
  });

  t.test('folders in priority order; one locked folder is reported and the others still run', async (t) => {
    const [a, b, c, d, e] = await Promise.all(['a', 'b', 'c', 'd', 'e'].map((x) => folder(`order-${x}`)));
    // e keeps its incrementals as they are: its own settings turn consolidation off.
    await writeFile(join(e!, 'imagekeep.json'), JSON.stringify({ settings: { consolidate: false } }));
    const eBefore = await images(e!);
    const dBefore = await images(d!);
    const cfg = join(dir, 'order.json');
    await writeFile(cfg, JSON.stringify({
      concurrency: 1,
      defaults: { timeZone: 'UTC', keepIncrementalDays: 0 },
      folders: [{ path: e, priority: 9 }, { path: b, priority: 5 }, { path: a, priority: 5 }, { path: c, priority: 1 }, { path: d, priority: 0 }],
    }));
    // d is in use, as by a backup running in another process.
    const lock = await FolderLock.acquire(d!, 'backup');
    let r;
    try {
      r = await imagekeep(['process', '--config', cfg, '--now', NOW]);
    } finally {
      await lock.release();
    }
    t.equal(r.code, 1, 'a non-zero exit: one folder could not be processed');
    t.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
    t.match(r.stderr, new RegExp(`^imagekeep: ${d} is in use by another imagekeep \\(pid \\d+ .*\\); wait for it to finish$`, 'm'), 'it names the locked folder and why');
    const order = [...new Set(r.stdout.split('\n').filter(Boolean).map((l) => l.slice(0, l.indexOf(': '))))];
    t.same(order, [c, a, b], 'lowest priority first, then alphabetical; every log line names its folder');
    for (const f of [a!, b!, c!]) {
      t.match(r.stdout, `${f}: collapsed`, `${f}: its collapses logged under its name`);
      for (const name of DAILIES) t.ok(await existsIn(f, name), `${name} in ${f}`);
    }
    t.same(await images(e!), eBefore, 'e (consolidation off in its imagekeep.json) is unchanged');
    t.same(await images(d!), dBefore, 'd (locked) is untouched');
  });

  t.test('concurrency 2 with --json: a report per folder', async (t) => {
    const paths = await Promise.all(['p', 'q', 'r'].map((x) => folder(`json-${x}`)));
    const cfg = join(dir, 'json.json');
    await writeFile(cfg, JSON.stringify({ concurrency: 2, defaults: { timeZone: 'UTC', keepIncrementalDays: 0 }, folders: paths.map((path) => ({ path })) }));
    const r = await imagekeep(['process', '--config', cfg, '--now', NOW, '--json']);
    t.equal(r.code, 0, r.stderr);
    const reports = JSON.parse(r.stdout) as { folder: string; ok: boolean; actions: { done: boolean }[] }[];
    t.same(reports.map((x) => x.folder).sort(), paths.sort(), 'every folder reported');
    t.ok(reports.every((x) => x.ok && x.actions.length > 0 && x.actions.every((a) => a.done)), 'each did its whole night');
    for (const p of paths) for (const name of DAILIES) t.ok(await existsIn(p, name), `${name} in ${p}`);
  });

  t.test('a collapse that does not fit is refused; nothing is lost; with room it runs', async (t) => {
    // A small file system of its own, filled until the night's first collapse cannot fit.
    const mnt = join(dir, 'small-fs');
    await mkdir(mnt);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'imagekeep-test', mnt]);
    t.teardown(() => run('umount', [mnt]).then(() => {}, () => {}));
    const f = join(mnt, 'backups');
    await cp(template, f, { recursive: true });
    // The first collapse (the first day) reads i001 and i002: the output needs about their size.
    const need = (await stat(join(f, 'C_VOL-b001-i001.spi'))).size + (await stat(join(f, 'C_VOL-b001-i002.spi'))).size;
    const st = await statfs(mnt);
    const leave = Math.floor(need / 2);
    t.ok(leave >= 32 * 1024, `room left for the lock, the log and the state store (${leave} bytes)`);
    await writeFile(join(mnt, 'filler'), Buffer.alloc(st.bavail * st.bsize - leave));
    const before = await images(f);
    const r = await imagekeep(['process', f, '--now', NOW, '--time-zone', 'UTC', '--keep-incremental-days', '0']);
    t.equal(r.code, 1, 'a non-zero exit');
    t.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
    t.match(r.stderr, /collapse into C_VOL-b001-i002-cd\.spi failed: not enough free space in .* to collapse: up to \d+ bytes needed, \d+ available; free space or turn consolidation off/);
    t.same(await images(f), before, 'every image and sidecar as it was');
    t.same((await readdir(f)).filter((x) => x.startsWith('.imagekeep-tmp-')), [], 'no temporary file');
    await rm(join(mnt, 'filler'));
    const again = await imagekeep(['process', f, '--now', NOW, '--time-zone', 'UTC', '--keep-incremental-days', '0']);
    t.equal(again.code, 0, again.stderr);
    for (const name of DAILIES) t.ok(await existsIn(f, name), `with room, ${name} is made`);
  });
});

async function existsIn(dir: string, name: string): Promise<boolean> {
  return stat(join(dir, name)).then(() => true, () => false);
}
