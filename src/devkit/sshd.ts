// A real OpenSSH server on 127.0.0.1 for tests and benchmarks (../shared/reference/hosts.md): fresh ed25519
// host and user keys in a temp folder, a known_hosts pinning the host key, sshd daemonised
// with its own config and stopped by its PidFile. Also kills or freezes it with its session
// processes on demand, to test a server that dies or hangs mid-stream.
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
const SSHD = '/usr/sbin/sshd';

export interface Sshd {
  host: string;
  port: number;
  /** The user tests log in as: the current one (root on test machines). */
  username: string;
  privateKeyPath: string;
  knownHostsPath: string;
  /** `ssh-ed25519 AAAA…` of the server's ed25519 host key (the one known_hosts pins). */
  hostPublicKey: string;
  /** Every host key sshd offers: ed25519 first, then the extra ones asked for. */
  hostKeys: { type: string; path: string; publicKey: string }[];
  /** The temp folder holding keys, config and log; tests may keep their files under it. */
  dir: string;
  logPath: string;
  /** With `sftpLog`: the sftp-server request log (see parseSftpWrites). */
  sftpLogPath: string;
  /** The listening sshd's pid. */
  pid: number;
  /** The options SshConnection.connect needs to log in. */
  connectOptions(): { host: string; port: number; username: string; privateKey: string; knownHostsPath: string };
  /** SIGKILLs sshd and every session process it forked: a host that dies mid-transfer. */
  kill(): void;
  /** SIGSTOPs them instead: a host that hangs with its TCP connections open. */
  freeze(): void;
  /** Stops sshd and its sessions, then removes `dir`. */
  stop(): Promise<void>;
}

/** `ssh-keygen -t TYPE -N '' -f path` (writes path and path.pub). */
export async function sshKeygen(path: string, type: 'ed25519' | 'ecdsa' | 'rsa' = 'ed25519'): Promise<void> {
  await run('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', 'imagekeep-test', '-f', path]);
}

export interface SshdOptions {
  /** Host keys to offer besides ed25519 (a host with several keys, as real hosts have). */
  extraHostKeyTypes?: ('ecdsa' | 'rsa')[];
  /**
   * Serve SFTP with OpenSSH's sftp-server logging every request (`-l DEBUG1`) to
   * `sftpLogPath`: what the server was asked to write, counted outside our code.
   */
  sftpLog?: boolean;
  /**
   * Environment of every session (sshd_config SetEnv, applied after sshd's own HOME and PATH),
   * e.g. a PATH with a folder of stand-in commands first. The login shell still reads
   * $HOME/.bashrc, which may put folders in front; a HOME in the test's folder avoids that.
   */
  setEnv?: Record<string, string>;
}

/** One SFTP write as the server logged it. */
export interface SftpWrite {
  path: string;
  offset: number;
  length: number;
}

/** The writes in an sftp-server DEBUG1 log, in the order the server did them. */
export function parseSftpWrites(log: string): SftpWrite[] {
  const writes: SftpWrite[] = [];
  for (const m of log.matchAll(/request \d+: write "(.*)" \(handle \d+\) off (\d+) len (\d+)/g)) {
    writes.push({ path: m[1]!, offset: Number(m[2]), length: Number(m[3]) });
  }
  return writes;
}

export async function startSshd(options: SshdOptions = {}): Promise<Sshd> {
  const dir = await mkdtemp(join(tmpdir(), 'imagekeep-sshd-'));
  try {
    return await startIn(dir, options.extraHostKeyTypes ?? [], !!options.sftpLog, options.setEnv ?? {});
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}

async function startIn(dir: string, extraTypes: ('ecdsa' | 'rsa')[], sftpLog: boolean, setEnv: Record<string, string>): Promise<Sshd> {
  // One SetEnv line: sshd takes the first line of most keywords and ignores the rest.
  const envPairs = Object.entries(setEnv).map(([k, v]) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k) || /["\n\\]/.test(v)) throw new Error(`setEnv ${k}: names are identifiers and values hold no quote, backslash or newline`);
    return `"${k}=${v}"`;
  });
  const envLines = envPairs.length > 0 ? [`SetEnv ${envPairs.join(' ')}`] : [];
  const types = ['ed25519' as const, ...extraTypes];
  const userKey = join(dir, 'user_ed25519');
  await Promise.all([...types.map((type) => sshKeygen(join(dir, `host_${type}`), type)), sshKeygen(userKey)]);
  await writeFile(join(dir, 'authorized_keys'), await readFile(`${userKey}.pub`));
  await mkdir('/run/sshd', { recursive: true }); // sshd's privilege-separation folder
  const hostKeys = await Promise.all(types.map(async (type) => {
    const path = join(dir, `host_${type}`);
    const publicKey = (await readFile(`${path}.pub`, 'utf8')).trim().split(/\s+/).slice(0, 2).join(' ');
    return { type: publicKey.split(' ')[0]!, path, publicKey };
  }));
  const hostPublicKey = hostKeys[0]!.publicKey;
  const config = join(dir, 'sshd_config');
  const logPath = join(dir, 'sshd.log');
  const pidFile = join(dir, 'sshd.pid');
  const sftpLogPath = join(dir, 'sftp.log');
  let subsystem = 'internal-sftp';
  if (sftpLog) {
    subsystem = join(dir, 'sftp-logged');
    await writeFile(subsystem, `#!/bin/sh\nexec /usr/lib/openssh/sftp-server -e -l DEBUG1 2>>${sftpLogPath}\n`, { mode: 0o755 });
  }

  // The port is free when we look; another process may take it before sshd binds, so retry.
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    await writeFile(config, [
      `Port ${port}`,
      'ListenAddress 127.0.0.1',
      ...hostKeys.map((k) => `HostKey ${k.path}`),
      `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
      'PermitRootLogin prohibit-password',
      'PasswordAuthentication no',
      'KbdInteractiveAuthentication no',
      'StrictModes no',
      `PidFile ${pidFile}`,
      'UsePAM no',
      `Subsystem sftp ${subsystem}`,
      ...envLines,
      '',
    ].join('\n'));
    await rm(pidFile, { force: true });
    await rm(logPath, { force: true });
    // sshd checks its config, daemonises, then binds and writes the PidFile.
    await run(SSHD, ['-f', config, '-E', logPath]).catch(async (e: Error) => {
      const log = await readFile(logPath, 'utf8').catch(() => '');
      throw new Error(`${SSHD} -f ${config} failed: ${e.message.trim()} ${log.trim()}`);
    });
    const pid = await waitForPid(pidFile, logPath);
    if (pid === null || !(await accepts(port))) {
      const log = await readFile(logPath, 'utf8').catch(() => '');
      if (pid !== null) killTree(pid, 'SIGKILL');
      if (attempt < 3 && /Cannot bind|Address already in use/.test(log)) continue;
      throw new Error(`sshd did not start listening on 127.0.0.1:${port}; its log says: ${log.trim() || '(nothing)'}`);
    }

    const knownHostsPath = join(dir, 'known_hosts');
    await writeFile(knownHostsPath, `[127.0.0.1]:${port} ${hostPublicKey}\n`);
    // A test that dies before stop() must not leave a server behind on this shared machine.
    const onExit = (): void => killTree(pid, 'SIGKILL');
    process.once('exit', onExit);
    const username = userInfo().username;
    return {
      host: '127.0.0.1',
      port,
      username,
      privateKeyPath: userKey,
      knownHostsPath,
      hostPublicKey,
      hostKeys,
      dir,
      logPath,
      sftpLogPath,
      pid,
      connectOptions: () => ({ host: '127.0.0.1', port, username, privateKey: userKey, knownHostsPath }),
      kill: () => killTree(pid, 'SIGKILL'),
      freeze: () => killTree(pid, 'SIGSTOP'),
      stop: async () => {
        process.removeListener('exit', onExit);
        killTree(pid, 'SIGTERM');
        killTree(pid, 'SIGCONT'); // a frozen server handles the SIGTERM only once it runs
        for (let i = 0; i < 50 && processAlive(pid); i++) await sleep(100);
        killTree(pid, 'SIGKILL');
        await rm(dir, { recursive: true, force: true });
      },
    };
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** The pid sshd wrote once it listens, or null if it died (its log says why). */
async function waitForPid(pidFile: string, logPath: string): Promise<number | null> {
  for (let i = 0; i < 100; i++) {
    const text = await readFile(pidFile, 'utf8').catch(() => '');
    const pid = Number(text.trim());
    if (pid > 0) return pid;
    const log = await readFile(logPath, 'utf8').catch(() => '');
    if (/fatal|Cannot bind/i.test(log)) return null;
    await sleep(50);
  }
  return null;
}

async function accepts(port: number): Promise<boolean> {
  for (let i = 0; i < 50; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return true;
    await sleep(50);
  }
  return false;
}

/** Signals `pid` and all its descendants (sshd forks a monitor and a session child per connection). Synchronous: usable in an exit handler. */
function killTree(pid: number, signal: NodeJS.Signals): void {
  const children = new Map<number, number[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(name)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${name}/stat`, 'utf8');
    } catch {
      continue;
    }
    // Fields after the parenthesised command name: state, ppid, ...
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    const list = children.get(ppid) ?? [];
    list.push(Number(name));
    children.set(ppid, list);
  }
  const tree: number[] = [];
  const walk = (p: number): void => {
    tree.push(p);
    for (const c of children.get(p) ?? []) walk(c);
  };
  walk(pid);
  for (const p of tree) {
    try {
      process.kill(p, signal);
    } catch {
      // already gone
    }
  }
}

/** Running, not a zombie (PID 1 here may not reap what it inherits). */
export function processAlive(pid: number): boolean {
  if (!(pid > 0)) return false;
  try {
    return !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
