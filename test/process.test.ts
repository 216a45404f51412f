// Proves process is crash-safe at every durable step of a night that collapses and removes, that --dry-run changes nothing, and that removal can move files into Incrementals/.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cp, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { loadProcessConfig } from '../src/chain/config.js';
import { KeyRing } from '../src/chain/image/reader.js';
import { openPoint } from '../src/chain/open.js';
import { processFolder } from '../src/chain/process.js';
import { ROOT, imagekeep, runNode, sha256File, tempDir, type RunResult } from './helpers/cli.js';
import { twoDayChain } from './helpers/rawdisk.js';

const run = promisify(execFile);
const NOW = '2026-10-03T00:05:00Z';
const NIGHT = ['--now', NOW, '--time-zone', 'UTC', '--keep-incremental-days', '0'];
/** NIGHT's settings as the command passes them to loadProcessConfig. */
const NIGHT_FLAGS = { timeZone: 'UTC', keepIncrementalDays: '0' };

/** The night of NIGHT run in-process: the settings the command line resolves from those flags, then processFolder. */
async function processNight(folder: string): Promise<Awaited<ReturnType<typeof processFolder>>> {
  const [f] = (await loadProcessConfig([folder], undefined, NIGHT_FLAGS)).folders;
  return processFolder(f!.path, f!.settings, { now: Date.parse(NOW), keyring: new KeyRing(null) });
}

/**
 * The night of NIGHT in a process of its own, made of the library calls the command's action
 * makes (src/cli/process-command.ts) from the same build (dist/) the command runs: a crash
 * needs a process to kill, and this one starts in about 60% of the command's CPU time,
 * because it does not load the other commands' modules. The test checks that its durable
 * steps are the command's, step for step.
 */
const NIGHT_SCRIPT = `
const [folder, now, flags] = process.argv.slice(1);
const dist = ${JSON.stringify(pathToFileURL(join(ROOT, 'dist')).href)};
const { loadProcessConfig } = await import(dist + '/chain/config.js');
const { processFolder } = await import(dist + '/chain/process.js');
const { KeyRing } = await import(dist + '/chain/image/reader.js');
const [f] = (await loadProcessConfig([folder], undefined, JSON.parse(flags))).folders;
const r = await processFolder(f.path, f.settings, { now: Date.parse(now), keyring: new KeyRing(null) });
process.exitCode = r.ok ? 0 : 1;
`;

function processNightInChild(folder: string, env: Record<string, string>): Promise<RunResult> {
  return runNode(['--input-type=module', '-e', NIGHT_SCRIPT, folder, NOW, JSON.stringify(NIGHT_FLAGS)], env);
}

/**
 * The durable steps printed with IMAGEKEEP_CRASH_TRACE=1, with what differs between two runs
 * of the same night taken out: the folder's path, the pid and random part of temporary
 * names, and the length of the verification state (it holds the copied files' mtimes).
 */
function stepsOf(stderr: string, folder: string): string[] {
  return stderr.split('\n').filter((l) => l.startsWith('durable step ')).map((l) => l
    .split(folder).join('<folder>')
    .replace(/\.imagekeep-tmp-\d+-[a-z0-9]+-/g, '.imagekeep-tmp-*-')
    .replace(/^(durable step \d+: write )\d+( B at 0 of <folder>\/\.imagekeep-tmp-\*-\.imagekeep-state\.json)$/, '$1*$2'));
}

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
  const states = await twoDayChain(src, template, 61);

  t.test('--dry-run changes nothing', async (t) => {
    const before = await listing(template);
    const r = await imagekeep(['process', template, ...NIGHT, '--dry-run']);
    t.equal(r.code, 0, r.stderr);
    t.match(r.stdout, /would collapse .* into C_VOL-b001-i002-cd.spi/);
    t.match(r.stdout, /would remove C_VOL-b001-i001.spi/);
    t.same(await listing(template), before, 'the folder is unchanged');
  });

  // The reference: the same night, uninterrupted, by the command, with its durable steps.
  const reference = join(dir, 'reference');
  await cp(template, reference, { recursive: true });
  const ref = await imagekeep(['process', reference, ...NIGHT], { IMAGEKEEP_CRASH_TRACE: '1' });
  t.equal(ref.code, 0, ref.stderr);
  const refSteps = stepsOf(ref.stderr, reference);
  const refImages = (await readdir(reference)).filter((x) => /\.(sp[fi]|md5)$/.test(x)).sort();
  t.ok(refImages.includes('C_VOL-b001-i005-cd.spi') && refImages.includes('C_VOL-b001-i002-cd.spi'), refImages.join(' '));

  // Each crash kills the night's process at its k-th step, for every k of the command's steps;
  // the rerun runs the same night in-process, through the library the command calls.
  t.test('killed at every durable step', async (t) => {
    let steps = 0;
    for (let k = 1; k < 400; k++) {
      const folder = join(dir, `k${k}`);
      await cp(template, folder, { recursive: true });
      const r = await processNightInChild(folder, { IMAGEKEEP_CRASH_AT: String(k), IMAGEKEEP_CRASH_TRACE: '1' });
      if (r.code === 0) {
        steps = k - 1;
        t.same(stepsOf(r.stderr, folder), refSteps, `uninterrupted, the night takes the ${refSteps.length} durable steps of imagekeep process, in order`);
        await rm(folder, { recursive: true });
        break;
      }
      t.equal(r.code, 137, `k=${k}: killed`);
      t.same(stepsOf(r.stderr, folder), refSteps.slice(0, k), `k=${k}: killed at the command's step ${k}: ${refSteps[k - 1]}`);
      await checkPoints(t, folder, states, `k=${k} after the crash`);
      const again = await processNight(folder);
      t.ok(again.ok, `k=${k}: the rerun completes ${JSON.stringify(again.actions.filter((a) => a.error))}`);
      t.same((await readdir(folder)).filter((x) => x.startsWith('.imagekeep-tmp') || x === '.imagekeep.lock'), [], `k=${k}: no temporary file or lock left`);
      t.same((await readdir(folder)).filter((x) => /\.(sp[fi]|md5)$/.test(x)).sort(), refImages, `k=${k}: the same files as an uninterrupted night`);
      await checkPoints(t, folder, states, `k=${k} after the rerun`);
      await rm(folder, { recursive: true });
    }
    t.ok(steps > 10 && steps === refSteps.length, `the night has ${steps} durable steps, each crashed once`);
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
