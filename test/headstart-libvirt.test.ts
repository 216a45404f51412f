// HeadStart end to end on a real libvirt host reached over a real sshd, through the CLI: a
// chain of a disk whose boot sector prints a marker on COM1; `run` seeds a qcow2 standby and
// defines the domain; `verify-boot` boots a throwaway overlay and leaves the standby
// byte-for-byte unchanged; `failover` starts the domain on the standby (the marker is read
// from its serial file), after which the job never writes the disk again.
import { execFile } from 'node:child_process';
import { chmod, mkdir, readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { bootSector } from '../src/devkit/boot-sector.js';
import { qemuCompare } from './helpers/disk-tools.js';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { LIBVIRT_URI, removeDomains, startLibvirt } from './helpers/libvirt.js';
import { startSshd } from './helpers/sshd.js';
import { keepCopy, nextPoint, startChain } from './helpers/standby-chain.js';

const run = promisify(execFile);
const MARKER = 'STANDBY-BOOTED';
const tmp = await tempDir('headstart-libvirt');
t.teardown(tmp.cleanup);
// libvirt's QEMU runs as libvirt-qemu: the folders above the disk must be searchable.
await chmod(tmp.dir, 0o755);

const h = await startChain({ dir: tmp.dir, size: 16 * 1024 * 1024, initialBlocks: 20, blocksPerPoint: 6, seed: 3, bootSector: bootSector(`${MARKER}\r\n`) });
for (let p = 1; p <= 3; p++) await nextPoint(h);
await keepCopy(h, 3);

const sshd = await startSshd({ setEnv: { HOME: tmp.dir } });
const libvirt = await startLibvirt();
const name = `ik-hs-${process.pid}`;
t.teardown(async () => {
  await removeDomains(name);
  await sshd.stop();
  await libvirt.stop();
});

const images = join(tmp.dir, 'images');
await mkdir(images);
await chmod(images, 0o755);
const serial = join(images, `${name}.serial.log`);
const jobPath = join(tmp.dir, 'standby.json');
const disk = join(images, `${name}.qcow2`);

t.test('init, run: seeded, applied, the domain defined but not started', async (t) => {
  const init = await imagekeep(['headstart', 'init', jobPath, '--source', h.folder, '--target', `ssh://${sshd.username}@127.0.0.1:${sshd.port}${images}`,
    '--format', 'qcow2', '--hypervisor', 'libvirt', '--name', name, '--memory', '64', '--cpus', '1', '--serial-log', serial,
    '--identity', sshd.privateKeyPath, '--known-hosts', sshd.knownHostsPath]);
  t.equal(init.code, 0, init.stderr);
  const r = await imagekeep(['headstart', 'run', jobPath, '--json']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout) as { applied: { point: number }; steps: { kind: string }[] };
  t.same(report.steps.map((s) => s.kind), ['seed', 'apply']);
  t.equal(report.applied.point, 3);
  t.equal((await qemuCompare(h.copies.get(3)!, disk, 'qcow2')).code, 0, 'the standby is identical to the source at point 3');
  const state = (await run('virsh', ['-c', LIBVIRT_URI, 'domstate', name])).stdout.trim();
  t.equal(state, 'shut off', 'the domain is defined and not running');
  const status = await imagekeep(['headstart', 'status', jobPath, '--json']);
  t.equal(status.code, 0, status.stderr);
  t.match(JSON.parse(status.stdout), { applied: { point: 3 }, pointsBehind: 0, failedOver: null });
});

t.test('verify-boot boots a throwaway overlay and leaves the standby unchanged', async (t) => {
  const before = await sha256File(disk);
  const r = await imagekeep(['headstart', 'verify-boot', jobPath, '--marker', MARKER, '--timeout', '90', '--json']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout) as { ok: boolean; how: string; point: number };
  t.ok(report.ok, 'the test boot saw the marker');
  t.equal(report.how, 'marker');
  t.equal(await sha256File(disk), before, 'the standby disk is byte-for-byte unchanged');
  t.notOk(existsSync(serial) && (await readFile(serial, 'latin1')).includes(MARKER), 'the standby domain itself was not started');
});

t.test('failover starts the domain on the standby; the job never writes it again', async (t) => {
  const r = await imagekeep(['headstart', 'failover', jobPath, '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { started: true, vm: name });
  const deadline = Date.now() + 60_000;
  let console = '';
  while (Date.now() < deadline && !console.includes(MARKER)) {
    console = existsSync(serial) ? await readFile(serial, 'latin1') : '';
    await new Promise((res) => setTimeout(res, 250));
  }
  t.match(console, MARKER, 'the boot sector on the standby disk ran: its marker is on the serial port');
  t.equal((await run('virsh', ['-c', LIBVIRT_URI, 'domstate', name])).stdout.trim(), 'running');
  await nextPoint(h);
  const again = await imagekeep(['headstart', 'run', jobPath]);
  t.equal(again.code, 1, 'run refuses a disk that was failed over');
  t.match(again.stderr, /failed over/);
  t.equal(again.stderr.trim().split('\n').length, 1, 'in one line');
});
