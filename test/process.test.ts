// Proves process is crash-safe at every durable step of a night that collapses and removes, that --dry-run changes nothing, and that removal can move files into Incrementals/.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cp, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { KeyRing } from '../src/chain/image/reader.js';
import { openPoint } from '../src/chain/open.js';
import { imagekeep, tempDir } from './helpers/cli.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';
import { sha256File } from './helpers/cli.js';

const run = promisify(execFile);
const NIGHT = ['--now', '2026-10-03T00:05:00Z', '--time-zone', 'UTC', '--keep-incremental-days', '0'];

async function listing(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const n of (await readdir(dir)).sort()) {
    if (n === 'imagekeep.log' || n === '.imagekeep-state.json') continue;
    const st = await stat(join(dir, n));
    out.push(`${n} ${st.isFile() ? st.size : 'dir'} ${st.mtimeMs}`);
  }
  return out;
}

/** Every image of the folder reads its point's recorded state. */
async function checkPoints(t: Test, dir: string, states: Map<number, string>, what: string): Promise<void> {
  for (const n of (await readdir(dir)).filter((n) => /\.sp[fi]$/.test(n) && !n.startsWith('.imagekeep-tmp-'))) {
    const { point } = await openPoint(join(dir, n), new KeyRing(null));
    try {
      const all = Buffer.alloc(point.size);
      await point.read(all, 0);
      t.equal(createHash('sha256').update(all).digest('hex'), states.get(point.top.header.last), `${what}: ${n} yields its point`);
    } finally {
      await point.close();
    }
  }
}

t.test('process', async (t) => {
  // On tmpfs: a killed process loses nothing the page cache holds, and fsync costs nothing there.
  const { dir, cleanup } = await tempDir('process', '/dev/shm');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  const template = join(dir, 'template');
  await makeRawDisk(src, 2 * 2 ** 20, 61, 2 ** 20);
  const states = new Map<number, string>();
  let n = 0;
  for (const day of ['2026-10-01', '2026-10-02']) {
    for (const hour of ['01', '09', '17']) {
      if (n > 0) await scribble(src, 600 + n, 3, 20_000);
      t.equal((await imagekeep(['backup', src, template, '--block-size', '4096', '--at', `${day}T${hour}:00:00Z`])).code, 0);
      states.set(n++, await sha256File(src));
    }
  }

  t.test('--dry-run changes nothing', async (t) => {
    const before = await listing(template);
    const r = await imagekeep(['process', template, ...NIGHT, '--dry-run']);
    t.equal(r.code, 0, r.stderr);
    t.match(r.stdout, /would collapse .* into C_VOL-b001-i002-cd.spi/);
    t.match(r.stdout, /would remove C_VOL-b001-i001.spi/);
    t.same(await listing(template), before, 'the folder is unchanged');
  });

  // The reference: the same night, uninterrupted.
  const reference = join(dir, 'reference');
  await cp(template, reference, { recursive: true });
  const ref = await imagekeep(['process', reference, ...NIGHT]);
  t.equal(ref.code, 0, ref.stderr);
  const refImages = (await readdir(reference)).filter((x) => /\.(sp[fi]|md5)$/.test(x)).sort();
  t.ok(refImages.includes('C_VOL-b001-i005-cd.spi') && refImages.includes('C_VOL-b001-i002-cd.spi'), refImages.join(' '));

  t.test('killed at every durable step', async (t) => {
    let steps = 0;
    for (let k = 1; k < 400; k++) {
      const folder = join(dir, `k${k}`);
      await cp(template, folder, { recursive: true });
      const r = await imagekeep(['process', folder, ...NIGHT], { IMAGEKEEP_CRASH_AT: String(k) });
      if (r.code === 0) {
        steps = k - 1;
        await rm(folder, { recursive: true });
        break;
      }
      t.equal(r.code, 137, `k=${k}: killed`);
      await checkPoints(t, folder, states, `k=${k} after the crash`);
      const again = await imagekeep(['process', folder, ...NIGHT]);
      t.equal(again.code, 0, `k=${k}: the rerun completes ${again.stderr}`);
      t.same((await readdir(folder)).filter((x) => x.startsWith('.imagekeep-tmp') || x === '.imagekeep.lock'), [], `k=${k}: no temporary file or lock left`);
      t.same((await readdir(folder)).filter((x) => /\.(sp[fi]|md5)$/.test(x)).sort(), refImages, `k=${k}: the same files as an uninterrupted night`);
      await checkPoints(t, folder, states, `k=${k} after the rerun`);
      await rm(folder, { recursive: true });
    }
    t.ok(steps > 10, `the night has ${steps} durable steps, each crashed once`);
  });

  t.test('removal into Incrementals/', async (t) => {
    const folder = join(dir, 'moved');
    await cp(template, folder, { recursive: true });
    const r = await imagekeep(['process', folder, ...NIGHT, '--removal', 'move']);
    t.equal(r.code, 0, r.stderr);
    const moved = (await readdir(join(folder, 'Incrementals'))).sort();
    t.ok(moved.includes('C_VOL-b001-i001.spi') && moved.includes('C_VOL-b001-i001.md5'), moved.join(' '));
    const { stdout } = await run('md5sum', ['-c', ...moved.filter((x) => x.endsWith('.md5'))], { cwd: join(folder, 'Incrementals') });
    t.notMatch(stdout, /FAILED/, 'moved files keep their .md5');
    t.same((await readdir(folder)).filter((x) => /\.(sp[fi]|md5)$/.test(x)).sort(), refImages, 'the folder itself as after deletion');
    t.match(await (await import('node:fs/promises')).readFile(join(folder, 'imagekeep.log'), 'utf8'), /moved to Incrementals\/ C_VOL-b001-i001.spi: /, 'every removal is logged with its reason');
  });
});
