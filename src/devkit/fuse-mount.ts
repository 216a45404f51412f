/**
 * FUSE mounts served by fuse2fs or ntfs-3g, run in the foreground as our child process.
 * Foreground matters on the way out: `umount` returns as soon as the kernel detaches the
 * mount, but the daemon still flushes its caches and writes the superblock afterwards, so
 * the image is only complete when the process has exited — which we can wait for only if
 * it is our child (a daemonised one detaches and leaves no handle).
 *
 * Every mount is registered in a caller-owned set until it is unmounted, so an owner can
 * unmount whatever is left after an error (`unmountAll`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, tail, ToolFailedError } from './exec.js';

export interface FuseMount {
  readonly dir: string;
  /** Unmounts and waits for the daemon to exit; idempotent. */
  unmount(): Promise<void>;
}

const MOUNT_TIMEOUT_MS = 15_000;
const EXIT_TIMEOUT_MS = 60_000;

/** The mount points listed in /proc/mounts (octal escapes such as \040 decoded). */
export async function mountPoints(): Promise<string[]> {
  const text = await readFile('/proc/mounts', 'utf8');
  return text
    .split('\n')
    .filter((line) => line.length > 0)
    .map((line) => (line.split(' ')[1] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

export async function isMounted(dir: string): Promise<boolean> {
  return (await mountPoints()).includes(dir);
}

/**
 * Starts `command args` (which must stay in the foreground and mount on `dir`) and resolves
 * once `dir` is a mount point. If the daemon exits first, rejects with its output.
 */
export async function fuseMount(command: string, args: string[], dir: string, registry?: Set<FuseMount>): Promise<FuseMount> {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const keep = (d: Buffer): void => {
    // ntfs-3g in no_detach mode chats on stderr; keep only the tail for error messages.
    output = (output + d.toString()).slice(-8192);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
    child.on('error', () => resolve({ code: null, signal: 'spawn-error' }));
  });
  let hasExited: { code: number | null; signal: string | null } | undefined;
  void exited.then((r) => (hasExited = r));

  const fail = (why: string): ToolFailedError =>
    new ToolFailedError(`${command} ${args.join(' ')}: ${why}: ${tail(output)}`, {
      command,
      args,
      exitCode: hasExited?.code ?? hasExited?.signal ?? null,
      stderr: output,
    });

  const start = Date.now();
  for (;;) {
    if (hasExited) throw fail(`exited (${hasExited.code ?? hasExited.signal}) before ${dir} was mounted`);
    if (await isMounted(dir)) break;
    if (Date.now() - start > MOUNT_TIMEOUT_MS) {
      child.kill('SIGKILL');
      await exited;
      throw fail(`${dir} not mounted after ${MOUNT_TIMEOUT_MS} ms`);
    }
    await sleep(5);
  }

  let done: Promise<void> | undefined;
  const mount: FuseMount = {
    dir,
    unmount: () => (done ??= unmountChild(child, dir, exited, fail).finally(() => registry?.delete(mount))),
  };
  registry?.add(mount);
  return mount;
}

async function unmountChild(
  child: ChildProcess,
  dir: string,
  exited: Promise<{ code: number | null; signal: string | null }>,
  fail: (why: string) => ToolFailedError,
): Promise<void> {
  // EBUSY happens when a file is still open (an fd our caller leaked, or a slow close
  // reaching the daemon): retry for ~2 s, then detach lazily so nothing stays mounted.
  for (let attempt = 0; (await isMounted(dir)) && attempt < 40; attempt++) {
    try {
      await run('umount', [dir]);
    } catch {
      await sleep(50);
    }
  }
  if (await isMounted(dir)) await run('umount', ['-l', dir]);
  const timer = setTimeout(() => child.kill('SIGKILL'), EXIT_TIMEOUT_MS);
  const { code, signal } = await exited;
  clearTimeout(timer);
  if (code !== 0) throw fail(`exited with ${code ?? signal} after unmounting ${dir}; the image may be incomplete`);
}

/** Unmounts every mount in `registry`, collecting failures instead of stopping at the first. */
export async function unmountAll(registry: Set<FuseMount>): Promise<void> {
  const errors: unknown[] = [];
  for (const m of [...registry]) {
    try {
      await m.unmount();
    } catch (err) {
      errors.push(err);
    }
  }
  if (errors.length === 1) throw errors[0];
  if (errors.length > 1) throw new AggregateError(errors, `${errors.length} unmounts failed`);
}
