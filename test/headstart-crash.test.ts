// A HeadStart run killed at each of its durable steps in turn (IMAGEKEEP_CRASH_AT=k), and one
// killed by SIGKILL mid-transfer over SSH: the state file never names a point the disk does
// not fully hold, and a rerun always ends identical to the newest point.
import { spawn } from 'node:child_process';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import { KeyRing } from '../src/chain/image/reader.js';
import { formats } from '../src/formats/drivers.js';
import { LocalHost } from '../src/headstart/host.js';
import { validateJob } from '../src/headstart/job.js';
import { runPass } from '../src/headstart/standby.js';
import { qemuCheck, qemuCompare } from './helpers/disk-tools.js';
import { BIN, imagekeep, tempDir } from './helpers/cli.js';
import { startSshd } from './helpers/sshd.js';
import { keepCopy, nextPoint, startChain } from './helpers/standby-chain.js';

const SIZE = 8 * 1024 * 1024 + 3 * 512;
const tmp = await tempDir('headstart-crash');
t.teardown(tmp.cleanup);

const h = await startChain({ dir: tmp.dir, size: SIZE, initialBlocks: 8, blocksPerPoint: 4, seed: 11 });
await keepCopy(h, 0);
await nextPoint(h);
await keepCopy(h, 1);
const NEWEST = 1;
const CHECKPOINT = { IMAGEKEEP_HEADSTART_CHECKPOINT: String(192 * 1024) };

interface StateDoc { applied: { point: number } | null; applying: unknown; seeding: unknown }

async function readState(path: string): Promise<StateDoc | null> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as StateDoc;
  } catch {
    return null;
  }
}

t.test('killed at every durable step of a seed and an apply, then rerun', async (t) => {
  // Two lanes, each with its own target folder, take alternate k.
  let total = Infinity;
  let crashes = 0;
  const lane = async (first: number): Promise<void> => {
    const target = join(tmp.dir, `crash-target-${first}`);
    const jobPath = join(tmp.dir, `crash-${first}.json`);
    await writeFile(jobPath, JSON.stringify({ version: 1, source: h.folder, target, disk: 'srv.vhdx', format: 'vhdx' }));
    for (let k = first; k < total; k += 2) {
      await rm(target, { recursive: true, force: true });
      const r = await imagekeep(['headstart', 'run', jobPath], { ...CHECKPOINT, IMAGEKEEP_CRASH_AT: String(k) });
      if (r.code === 0) {
        total = Math.min(total, k);
        break;
      }
      crashes++;
      if (r.code !== 137) {
        t.fail(`k=${k}: expected a SIGKILL, got exit ${r.code}: ${r.stderr}`);
        break;
      }
      // What the state file says after the crash must be true of the disk.
      const state = await readState(join(target, 'srv.vhdx.headstart.json'));
      if (state?.applied && !state.applying && !state.seeding) {
        const cmp = await qemuCompare(h.copies.get(state.applied.point)!, join(target, 'srv.vhdx'), 'vhdx');
        if (cmp.code !== 0) t.fail(`k=${k}: the state names point ${state.applied.point} but the disk differs from it: ${cmp.stdout}${cmp.stderr}`);
      }
      // The rerun runs in this process (a spawn per k would double the test's time).
      try {
        await runPass({ job: validateJob(JSON.parse(await readFile(jobPath, 'utf8')), jobPath), host: new LocalHost(), dir: target, registry: formats, keyring: new KeyRing(null), inlineDecode: true, checkpointBytes: 192 * 1024 });
      } catch (e) {
        t.fail(`k=${k}: the rerun failed: ${(e as Error).message}`);
        continue;
      }
      const cmp = await qemuCompare(h.copies.get(NEWEST)!, join(target, 'srv.vhdx'), 'vhdx');
      if (cmp.code !== 0) t.fail(`k=${k}: after the rerun the disk is not the newest point: ${cmp.stdout}${cmp.stderr}`);
      const chk = await qemuCheck(join(target, 'srv.vhdx'), 'vhdx');
      if (chk.code !== 0) t.fail(`k=${k}: qemu-img check after the rerun: ${chk.stdout}${chk.stderr}`);
      const final = await readState(join(target, 'srv.vhdx.headstart.json'));
      if (final?.applied?.point !== NEWEST || final.applying || final.seeding) t.fail(`k=${k}: the rerun's state is not "applied ${NEWEST}": ${JSON.stringify(final)}`);
      const left = (await readdir(target)).filter((n) => n.startsWith('.') || n.endsWith('.tmp'));
      if (left.length > 0) t.fail(`k=${k}: temporary files left: ${left.join(', ')}`);
    }
  };
  await Promise.all([lane(1), lane(2)]);
  t.ok(total > 20 && total < Infinity, `the run has ${total - 1} durable steps`);
  t.equal(crashes, total - 1, `each of the ${total - 1} steps crashed once, and each rerun ended identical to the newest point`);
});

t.test('SIGKILL mid-transfer over SSH, then a rerun', async (t) => {
  const sshd = await startSshd();
  t.teardown(() => sshd.stop());
  const dir = join(tmp.dir, 'killed');
  await mkdir(dir);
  const jobPath = join(tmp.dir, 'killed.json');
  // 1 MB/s: the seed takes seconds, long enough to be killed in the middle.
  await writeFile(jobPath, JSON.stringify({
    version: 1, source: h.folder, target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${dir}`, disk: 'srv.qcow2', format: 'qcow2',
    bandwidthMBps: 0.25, ssh: { identity: sshd.privateKeyPath, knownHosts: sshd.knownHostsPath },
  }));
  const child = spawn(process.execPath, [BIN, 'headstart', 'run', jobPath], { stdio: 'ignore', env: { ...process.env, IMAGEKEEP_HEADSTART_CHECKPOINT: String(192 * 1024) } });
  const exited = new Promise<string | null>((resolve) => child.on('exit', (_c, s) => resolve(s)));
  // Kill it once the seed is under way (its state file says so), a moment into the transfer.
  const statePath = join(dir, 'srv.qcow2.headstart.json');
  for (let i = 0; i < 600 && !(await readState(statePath))?.seeding; i++) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, 300));
  child.kill('SIGKILL');
  t.equal(await exited, 'SIGKILL', 'killed while transferring');
  const state = await readState(join(dir, 'srv.qcow2.headstart.json'));
  t.ok(state && (state.seeding || state.applying), `the state shows unfinished work: ${JSON.stringify(state)}`);
  await writeFile(jobPath, JSON.stringify({
    version: 1, source: h.folder, target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${dir}`, disk: 'srv.qcow2', format: 'qcow2',
    ssh: { identity: sshd.privateKeyPath, knownHosts: sshd.knownHostsPath },
  }));
  const r = await imagekeep(['headstart', 'run', jobPath, '--json'], { IMAGEKEEP_HEADSTART_CHECKPOINT: String(192 * 1024) });
  t.equal(r.code, 0, r.stderr);
  t.equal((await qemuCompare(h.copies.get(NEWEST)!, join(dir, 'srv.qcow2'), 'qcow2')).code, 0, 'the rerun ends identical to the newest point');
  t.equal((await qemuCheck(join(dir, 'srv.qcow2'), 'qcow2')).code, 0, 'qemu-img check is clean');
});
