// HeadStart over a real OpenSSH server: seed a standby disk from a 20-point chain, then apply
// 10 more points. The server's own request log counts what was written; qemu-img compares
// the disk with the source disk as it was at that point (kept by the test).
import { readFile, truncate, writeFile, stat, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import { formats } from '../src/formats/drivers.js';
import { defaultPolicySettings } from '../src/chain/policy/settings.js';
import { processFolder } from '../src/chain/process.js';
import { KeyRing } from '../src/chain/image/reader.js';
import { SshHost, LocalHost, type Host } from '../src/headstart/host.js';
import { validateJob, type Job } from '../src/headstart/job.js';
import { runPass, type StandbyContext } from '../src/headstart/standby.js';
import { loadStandbyState, saveStandbyState } from '../src/headstart/standby-state.js';
import { qemuCheck, qemuCompare, qemuInfo, runTool } from './helpers/disk-tools.js';
import { imagekeep, readFileAt, sha256File, tempDir } from './helpers/cli.js';
import { parseSftpWrites, startSshd, type SftpWrite } from './helpers/sshd.js';
import { CHAIN_BLOCK, keepCopy, nextPoint, startChain, touchedBetween, type ChainHistory } from './helpers/standby-chain.js';

const SIZE = 40 * 1024 * 1024 + 7 * 512; // no format's block size divides it

const tmp = await tempDir('headstart');
t.teardown(tmp.cleanup);
const sshd = await startSshd({ sftpLog: true });
t.teardown(() => sshd.stop());

function job(h: ChainHistory, fields: Partial<Job> & Pick<Job, 'target' | 'disk' | 'format'>): Job {
  return validateJob({ version: 1, source: h.folder, lag: 'newest', hypervisor: 'none', ...fields }, 'test job');
}

/**
 * The writes that landed in guest data. For qcow2, qemu-img map says where the guest clusters
 * are in the file (its L2 tables and refcount blocks are cluster-sized too); VHDX metadata
 * writes (headers, BAT sectors) are 4 KiB, a flat extent holds only data.
 */
async function dataWrites(format: string, path: string, writes: SftpWrite[]): Promise<SftpWrite[]> {
  if (format !== 'qcow2') return writes.filter((w) => w.length % CHAIN_BLOCK === 0);
  const map = JSON.parse((await runTool('qemu-img', ['map', '--output=json', '-f', 'qcow2', path])).stdout) as { length: number; data: boolean; offset?: number }[];
  // Guest clusters with a place in the file (data, or allocated and flagged zero).
  const ranges = map.filter((m) => m.offset !== undefined).map((m) => [m.offset!, m.offset! + m.length] as const);
  // The parts of each write that fall inside guest clusters.
  const pieces: SftpWrite[] = [];
  for (const w of writes) {
    for (const [a, b] of ranges) {
      const from = Math.max(a, w.offset);
      const to = Math.min(b, w.offset + w.length);
      if (from < to) pieces.push({ path: w.path, offset: from, length: to - from });
    }
  }
  return pieces;
}

async function pass(j: Job, host: Host, dir: string, extra: Partial<StandbyContext> = {}) {
  return runPass({ job: j, host, dir, registry: formats, keyring: new KeyRing(null), inlineDecode: true, ...extra });
}

const h = await startChain({ dir: tmp.dir, size: SIZE, initialBlocks: 160, blocksPerPoint: 16, seed: 6 });
for (let p = 1; p < 20; p++) await nextPoint(h);
await keepCopy(h, 19);

const cases: { name: string; format: Job['format']; subformat?: string; dir: string; disk: string; qemuFile: string }[] = [
  { name: 'Hyper-V VHDX', format: 'vhdx', dir: join(tmp.dir, 'hyperv', 'VMs'), disk: 'srv.vhdx', qemuFile: 'srv.vhdx' },
  { name: 'ESXi vmfs VMDK on a datastore path', format: 'vmdk', subformat: 'vmfs', dir: join(tmp.dir, 'vmfs', 'volumes', 'datastore1', 'srv'), disk: 'srv.vmdk', qemuFile: 'srv.vmdk' },
  { name: 'libvirt qcow2', format: 'qcow2', dir: join(tmp.dir, 'libvirt', 'images'), disk: 'srv.qcow2', qemuFile: 'srv.qcow2' },
];

const host = await SshHost.connect(sshd.connectOptions());
t.teardown(() => host.close());

t.test('seed from the base, then apply points 1..19', async (t) => {
 for (const c of cases) {
  const j = job(h, { target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${c.dir}`, disk: c.disk, format: c.format, ...(c.subformat ? { subformat: c.subformat } : {}) });
  await mkdir(c.dir, { recursive: true });
  const r = await pass(j, host, c.dir);
  t.same(r.steps.map((s) => s.kind), ['seed', 'apply'], `${c.name}: the first run seeds from the base, then applies points 1..19`);
  t.equal(r.applied?.point, 19);
  const cmp = await qemuCompare(h.copies.get(19)!, join(c.dir, c.qemuFile), c.format);
  t.equal(cmp.code, 0, `${c.name}: qemu-img compare with the source at point 19: ${cmp.stdout}${cmp.stderr}`);
 }
});

t.test('ten more points: only the union of their changed blocks is sent, each once', async (t) => {
 // The server logs every write from here on.
 for (let p = 20; p < 30; p++) await nextPoint(h);
 await keepCopy(h, 29);
 const union = touchedBetween(h, 20, 29);
 let nonZeroAt29 = 0;
 for (const b of union) if ((await readFileAt(h.copies.get(29)!, b * CHAIN_BLOCK, CHAIN_BLOCK)).some((x) => x !== 0)) nonZeroAt29++;
 for (const c of cases) {
  await truncate(sshd.sftpLogPath, 0).catch(() => {});
  const j = job(h, { target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${c.dir}`, disk: c.disk, format: c.format, ...(c.subformat ? { subformat: c.subformat } : {}) });
  const r = await pass(j, host, c.dir);
  t.same(r.steps.map((s) => `${s.kind} ${s.from?.point}->${s.to.point}`), ['apply 19->29'], `${c.name}: one apply of points 20..29`);
  t.equal(r.steps[0]!.written.blocks, union.size, `${c.name}: the apply wrote the ${union.size} blocks those 10 points changed, each once`);

  // What the server was asked to write to the disk's data, outside our code: data writes are
  // whole 64 KiB blocks (metadata writes are smaller), they never overlap, and they add up
  // to exactly the union of the changed blocks.
  const log = await readFile(sshd.sftpLogPath, 'utf8');
  const dataFile = c.format === 'vmdk' ? join(c.dir, 'srv-flat.vmdk') : join(c.dir, c.disk);
  // The client splits a long write into requests of its chunk size: join back-to-back requests.
  const writes: SftpWrite[] = [];
  for (const w of parseSftpWrites(log).filter((x) => x.path === dataFile)) {
    const last = writes[writes.length - 1];
    if (last && last.offset + last.length === w.offset) last.length += w.length;
    else writes.push({ ...w });
  }
  const data = await dataWrites(c.format, join(c.dir, c.qemuFile), writes);
  const metadataBytes = writes.reduce((n, w) => n + w.length, 0) - data.reduce((n, w) => n + w.length, 0);
  const dataBytes = data.reduce((n, w) => n + w.length, 0);
  // A block that ends up zero where the disk never allocated space needs no write at all.
  const expected = union.size * CHAIN_BLOCK;
  const atLeast = nonZeroAt29 * CHAIN_BLOCK;
  t.ok(dataBytes <= expected && dataBytes >= atLeast,
    `${c.name}: the server received ${dataBytes} bytes of block data: the ${union.size} changed blocks (${nonZeroAt29} of them non-zero at point 29), nothing else`);
  const sorted = [...data].sort((a, b) => a.offset - b.offset);
  t.ok(sorted.every((w, i) => i === 0 || sorted[i - 1]!.offset + sorted[i - 1]!.length <= w.offset), `${c.name}: no block was written twice`);
  t.ok(metadataBytes < 512 * 1024, `${c.name}: metadata writes are small (${metadataBytes} bytes)`);

  const cmp = await qemuCompare(h.copies.get(29)!, join(c.dir, c.qemuFile), c.format);
  t.equal(cmp.code, 0, `${c.name}: qemu-img compare with the source at point 29 (kept by the test): ${cmp.stdout}${cmp.stderr}`);
  const info = await qemuInfo(join(c.dir, c.qemuFile), c.format);
  t.equal(info['virtual-size'], SIZE, `${c.name}: qemu-img info gives the source's size`);
  if (c.format !== 'vmdk' || c.subformat !== 'vmfs') {
    const chk = await qemuCheck(join(c.dir, c.qemuFile), c.format);
    t.equal(chk.code, 0, `${c.name}: qemu-img check is clean: ${chk.stdout}${chk.stderr}`);
  }

  // Nothing new: the disk file is not touched at all.
  const before = await sha256File(dataFile);
  const mtime = (await stat(dataFile)).mtimeMs;
  await truncate(sshd.sftpLogPath, 0).catch(() => {});
  const again = await pass(j, host, c.dir);
  t.ok(again.upToDate, `${c.name}: a run with nothing new reports up to date`);
  t.equal(await sha256File(dataFile), before, `${c.name}: ...and leaves the disk byte-for-byte unchanged`);
  t.equal((await stat(dataFile)).mtimeMs, mtime);
  t.equal(parseSftpWrites(await readFile(sshd.sftpLogPath, 'utf8')).length, 0, `${c.name}: ...with no write at all`);
 }
});

t.test('a new base re-seeds into a new file that replaces the disk when complete', async (t) => {
  const c = cases[0]!;
  const j = job(h, { target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${c.dir}`, disk: c.disk, format: c.format });
  await nextPoint(h, { full: true });
  await nextPoint(h);
  const copy = await keepCopy(h, 31);
  const r = await pass(j, host, c.dir);
  t.same(r.steps.map((s) => s.kind), ['seed', 'apply']);
  const state = await loadStandbyState(host, c.dir, c.disk);
  t.equal(state?.base, 2, 'the state names the new chain');
  t.equal(state?.applied?.point, 1);
  t.equal((await qemuCompare(copy, join(c.dir, c.disk), c.format)).code, 0, 'the disk holds the newest point of the new chain');
  t.notOk(await stat(join(c.dir, `.seeding-${c.disk}`)).catch(() => null), 'no temporary file is left');
});

t.test('lag: at least N hours behind, and newest', async (t) => {
  const dir = join(tmp.dir, 'lag');
  await mkdir(dir);
  const j = job(h, { target: dir, disk: 'lag.vhdx', format: 'vhdx', lag: '3h' });
  const newest = h.times[h.times.length - 1]!;
  const r = await pass(j, new LocalHost(), dir, { now: newest + 30 * 60_000 });
  // Points are an hour apart: 30 minutes after the newest, 3 hours back is 3 points older... but
  // only points of the current chain (the new base and its one incremental) count.
  t.equal(r.applied?.point, 0, 'with 3h lag only the new base is old enough');
  const later = await pass(j, new LocalHost(), dir, { now: newest + 4 * 3600_000 });
  t.equal(later.applied?.point, 1, 'four hours later the newest point is allowed');
});

t.test('lag: daily applies only points that end a daily file', async (t) => {
  const dir = join(tmp.dir, 'daily');
  await mkdir(dir);
  // Monday 2026-11-02 20:00 UTC (the base) to Tuesday 03:00: points 1..3 on Monday, 4..7 on Tuesday.
  const d = await startChain({ dir, size: 4 * 1024 * 1024, initialBlocks: 10, blocksPerPoint: 3, seed: 21, start: Date.UTC(2026, 10, 2, 20) });
  for (let p = 1; p <= 7; p++) await nextPoint(d);
  // Tuesday noon: Monday is collapsed into a -cd file ending at point 3; Tuesday is today.
  const report = await processFolder(d.folder, defaultPolicySettings('UTC'), { now: Date.UTC(2026, 10, 3, 12), keyring: new KeyRing(null) });
  t.ok(report.ok);
  const target = join(dir, 'standby');
  await mkdir(target);
  const daily = job(d, { target, disk: 'd.vhdx', format: 'vhdx', lag: 'daily' });
  const r = await pass(daily, new LocalHost(), target, { now: Date.UTC(2026, 10, 3, 12) });
  t.equal(r.applied?.point, 3, 'daily: the end of Monday\'s -cd file, not the newest point');
  const copy = await keepCopy(d, 7);
  const newest = await pass({ ...daily, lag: 'newest' }, new LocalHost(), target, { now: Date.UTC(2026, 10, 3, 12) });
  t.equal(newest.applied?.point, 7, 'newest: the newest point');
  t.equal((await qemuCompare(copy, join(target, 'd.vhdx'), 'vhdx')).code, 0);

  // An apply to point 7 cut short after writing its blocks, and point 7's file found bad since:
  // writing the blocks changed up to 6 would leave point 7's own changes on the disk, so the
  // run must refuse rather than record point 6.
  const host = new LocalHost();
  const state = (await loadStandbyState(host, target, 'd.vhdx'))!;
  await saveStandbyState(host, target, { ...state, applied: r.applied, applying: state.applied });
  await writeFile(join(d.folder, 'SYS-b001.bad.log'), 'SYS-b001-i007.spi\tdamaged (test)\n');
  await t.rejects(pass({ ...daily, lag: 'newest' }, host, target, { now: Date.UTC(2026, 10, 3, 12) }), { code: 'MID_APPLY' }, 'a cut-short apply is never "finished" to an older point');
});

t.test('unknown and changed host keys are refused', async (t) => {
  const empty = join(tmp.dir, 'known_hosts_empty');
  await writeFile(empty, '');
  const jobPath = join(tmp.dir, 'refused.json');
  await writeFile(jobPath, JSON.stringify({
    version: 1, source: h.folder, target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${join(tmp.dir, 'refused')}`, disk: 'x.vhdx', format: 'vhdx',
    ssh: { identity: sshd.privateKeyPath, knownHosts: empty },
  }));
  const r = await imagekeep(['headstart', 'run', jobPath]);
  t.equal(r.code, 1, 'an unknown host key fails the run');
  t.match(r.stderr, /not in|unknown|no key/i);
  t.match(r.stderr, /SHA256:/, 'the message shows the fingerprint to check');
  t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
  const wrong = join(tmp.dir, 'known_hosts_wrong');
  await writeFile(wrong, `[127.0.0.1]:${sshd.port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGjvK7I4o3PEU0d1wPBH9iBOJ0kGvfnVlbLG7Om9oQnr\n`);
  await writeFile(jobPath, JSON.stringify({
    version: 1, source: h.folder, target: `ssh://${sshd.username}@127.0.0.1:${sshd.port}${join(tmp.dir, 'refused')}`, disk: 'x.vhdx', format: 'vhdx',
    ssh: { identity: sshd.privateKeyPath, knownHosts: wrong },
  }));
  const w = await imagekeep(['headstart', 'run', jobPath]);
  t.equal(w.code, 1, 'a changed host key fails the run');
  t.match(w.stderr, /changed|does not match|mismatch/i);
  t.notOk(await stat(join(tmp.dir, 'refused')).catch(() => null), 'nothing was created on the host');
  t.notMatch(w.stderr + r.stderr, /BEGIN OPENSSH PRIVATE KEY/, 'the key never appears');
});
