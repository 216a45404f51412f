// A real libvirt daemon with the QEMU driver for tests, on a machine without systemd
// (../shared/reference/hosts.md): makes the standard folders, starts virtlogd and libvirtd
// daemonised with pid files when they are not running, waits until `virsh -c qemu:///system
// version` answers, and stops them again when the last test process using them is done.
//
// Test files run in parallel (tap jobs), so the daemons are shared: each user registers its
// pid under STATE_DIR/users, a lock folder serialises start and stop, and the daemons are
// stopped only by the helper that started them (its pid files are in STATE_DIR), when no live
// user is left. Daemons someone else started are never stopped.
//
// One fix-up on the way: udev (absent here) would give /dev/kvm to group kvm. Left root-only,
// libvirt probes QEMU as root with KVM, then finds KVM unusable by libvirt-qemu, declares its
// capability cache stale and re-probes every QEMU binary on every domain start (about 70 s).
import { processAlive } from '../../src/devkit/sshd.js';
import { execFile, spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { chmod, chown, mkdir, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const LIBVIRT_URI = 'qemu:///system';
const STATE_DIR = '/run/imagekeep-test-libvirt';
const LOCK_DIR = `${STATE_DIR}/lock`;
const USERS_DIR = `${STATE_DIR}/users`;
const DAEMONS = ['virtlogd', 'libvirtd'] as const;

export interface Libvirt {
  uri: string;
  /** Unregisters this process; the last user stops the daemons the helper started. */
  stop(): Promise<void>;
}

export async function startLibvirt(): Promise<Libvirt> {
  for (const d of ['/var/log/libvirt', '/var/run/libvirt', '/var/lib/libvirt/qemu', '/var/cache/libvirt', USERS_DIR]) await mkdir(d, { recursive: true });
  await withLock(async () => {
    await writeFile(`${USERS_DIR}/${process.pid}`, '');
    await kvmForGroupKvm();
    if (await answers()) return;
    for (const daemon of DAEMONS) {
      if (runningPids(daemon).length > 0) continue;
      const pidFile = `${STATE_DIR}/${daemon}.pid`;
      await rm(pidFile, { force: true });
      await daemonise(daemon, pidFile);
    }
    await waitUntilAnswering();
  });
  let stopped = false;
  return {
    uri: LIBVIRT_URI,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      await withLock(async () => {
        await rm(`${USERS_DIR}/${process.pid}`, { force: true });
        const users = await readdir(USERS_DIR);
        for (const p of users.filter((u) => !processAlive(Number(u)))) await rm(`${USERS_DIR}/${p}`, { force: true });
        const others = users.filter((u) => processAlive(Number(u)));
        if (others.length > 0) return;
        // libvirtd first: it talks to virtlogd while it shuts down.
        for (const daemon of [...DAEMONS].reverse()) await stopStarted(daemon);
      });
    },
  };
}

/** Domains whose name starts with `prefix` are destroyed and undefined (a test's leftovers). */
export async function removeDomains(prefix: string): Promise<void> {
  const { stdout } = await run('virsh', ['-c', LIBVIRT_URI, 'list', '--all', '--name']);
  for (const name of stdout.split('\n').map((l) => l.trim()).filter((n) => n.startsWith(prefix))) {
    await run('virsh', ['-c', LIBVIRT_URI, 'destroy', name]).catch(() => {});
    await run('virsh', ['-c', LIBVIRT_URI, 'undefine', '--nvram', name]).catch(() =>
      run('virsh', ['-c', LIBVIRT_URI, 'undefine', name]).catch(() => {}));
  }
}

/** Runs `daemon -d -p pidFile` with no pipes to us (a daemon holding them would keep execFile waiting). */
function daemonise(daemon: string, pidFile: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(`/usr/sbin/${daemon}`, ['-d', '-p', pidFile], {
      stdio: 'ignore',
      env: { ...process.env, LIBVIRT_LOG_OUTPUTS: `3:file:/var/log/libvirt/${daemon}.log` },
    });
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(`${daemon} -d exited with ${code ?? signal}; see /var/log/libvirt/${daemon}.log`));
    });
  });
}

async function answers(): Promise<boolean> {
  try {
    await run('virsh', ['-c', LIBVIRT_URI, 'version'], { timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

async function waitUntilAnswering(): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (await answers()) return;
    if (runningPids('libvirtd').length === 0) break;
    await sleep(200);
  }
  const log = await readFile('/var/log/libvirt/libvirtd.log', 'utf8').catch(() => '');
  const lastError = log.split('\n').filter((l) => / error : /.test(l)).pop() ?? '(no error logged)';
  throw new Error(`libvirtd does not answer virsh -c ${LIBVIRT_URI} version; its last error: ${lastError}`);
}

async function stopStarted(daemon: string): Promise<void> {
  const pidFile = `${STATE_DIR}/${daemon}.pid`;
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (pid > 0 && processAlive(pid) && comm(pid) === daemon) {
    process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 50 && processAlive(pid); i++) await sleep(100);
    if (processAlive(pid)) process.kill(pid, 'SIGKILL');
  }
  await rm(pidFile, { force: true });
}

async function kvmForGroupKvm(): Promise<void> {
  const st = await stat('/dev/kvm').catch(() => null);
  if (!st) return;
  const kvm = readFileSync('/etc/group', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[0] === 'kvm');
  if (!kvm) throw new Error('group kvm is missing; run scripts/setup');
  const gid = Number(kvm[2]);
  if (st.gid !== gid || (st.mode & 0o060) !== 0o060) {
    await chown('/dev/kvm', st.uid, gid);
    await chmod('/dev/kvm', (st.mode & 0o777) | 0o060);
  }
}

/** A lock folder; one left by a dead process is taken over. */
async function withLock<T>(body: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      await mkdir(LOCK_DIR);
      await writeFile(`${LOCK_DIR}/pid`, String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = Number((await readFile(`${LOCK_DIR}/pid`, 'utf8').catch(() => '')).trim());
      if (owner > 0 && !processAlive(owner)) await rm(LOCK_DIR, { recursive: true, force: true });
      else if (Date.now() > deadline) throw new Error(`${LOCK_DIR} is held by pid ${owner || '?'} for over a minute`);
      else await sleep(100);
    }
  }
  try {
    return await body();
  } finally {
    await rm(LOCK_DIR, { recursive: true, force: true });
  }
}

function runningPids(name: string): number[] {
  return readdirSync('/proc').filter((p) => /^[0-9]+$/.test(p)).map(Number).filter((pid) => comm(pid) === name && processAlive(pid));
}

function comm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
