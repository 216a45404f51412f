// For the mount tests: the imagekeep command with its mount commands, run as another process (never read a FUSE mount from the process serving it), and independent readers.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { BIN, ROOT, type RunResult } from './cli.js';

export const MiB = 2 ** 20;

export function runNode(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? 128, stdout, stderr }));
  });
}

/**
 * bin/imagekeep.js once main.ts wires the mount commands; until then a stand-in that wires
 * only them, the same way main.ts does. `note` says which was chosen.
 */
export async function mountCommandLine(dir: string): Promise<{ cli: string; note: string }> {
  const main = await readFile(join(ROOT, 'dist/cli/main.js'), 'utf8').catch(() => '');
  if (main.includes('addMountCommands')) return { cli: BIN, note: 'bin/imagekeep.js' };
  const harness = join(dir, 'imagekeep-mount.mjs');
  await writeFile(harness, `
const { Command } = await import(${JSON.stringify(join(ROOT, 'node_modules/commander/esm.mjs'))});
const { addMountCommands } = await import(${JSON.stringify(join(ROOT, 'dist/cli/mount-command.js'))});
const { describeError } = await import(${JSON.stringify(join(ROOT, 'dist/cli/errors.js'))});
const interrupt = new AbortController();
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => interrupt.abort());
const program = new Command('imagekeep').exitOverride();
addMountCommands(program, interrupt);
try { await program.parseAsync(process.argv); } catch (e) {
  if (typeof e.code === 'string' && e.code.startsWith('commander.')) process.exitCode = 2;
  else { const { line, code } = describeError(e); process.stderr.write('imagekeep: ' + line + '\\n'); process.exitCode = code; }
}
`);
  return { cli: harness, note: 'a stand-in wiring the mount commands (dist/cli/main.js lacks them)' };
}

/** Mount points under `under` in /proc/mounts. */
export async function ourMounts(under: string): Promise<string[]> {
  return (await readFile('/proc/mounts', 'utf8')).split('\n').map((l) => l.split(' ')[1] ?? '').filter((w) => w.startsWith(under));
}

/** Lazily unmounts whatever is left under `under`, deepest first (a teardown after a failed assertion). */
export async function unmountLeftovers(under: string): Promise<void> {
  for (const m of (await ourMounts(under)).sort((a, b) => b.length - a.length)) {
    await new Promise((r) => spawn('umount', ['-l', m]).on('close', r));
  }
}

/** sha256 of `length` bytes of a file from `offset` (async reads: safe on a mount served by another process). */
export async function sha256Range(path: string, offset: number, length: number): Promise<string> {
  const h = createHash('sha256');
  const f = await open(path, 'r');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let done = 0; done < length;) {
      const n = Math.min(buf.length, length - done);
      const { bytesRead } = await f.read(buf, 0, n, offset + done);
      if (bytesRead !== n) throw new Error(`short read of ${path} at ${offset + done}`);
      h.update(buf.subarray(0, n));
      done += n;
    }
  } finally {
    await f.close();
  }
  return h.digest('hex');
}

/** Runs a tool; resolves with its exit code and output (never rejects on a non-zero exit). */
export function tool(cmd: string, args: string[]): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? 128, stdout: Buffer.concat(out), stderr }));
  });
}
