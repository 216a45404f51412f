// Runs the built `imagekeep` command (dist/, built by scripts/test) as a user would.
import { spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const BIN = join(ROOT, 'bin/imagekeep.js');

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * NODE_OPTIONS without tap's process-tracking hook (@tapjs/processinfo), which tap puts into
 * every process a test starts (and puts back if the test's environment drops it). It only
 * serves coverage, which this project turns off, and it roughly doubles a command's start-up
 * CPU. `env NODE_OPTIONS=...` sets it after tap has.
 */
const plainNodeOptions = (process.env.NODE_OPTIONS ?? '').split(/\s+/).filter((o) => o !== '' && !o.includes('@tapjs/processinfo')).join(' ');

/** `node ARGS` with `env` added to this process's environment, minus tap's hook. */
export function runNode(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn('env', [`NODE_OPTIONS=${plainNodeOptions}`, process.execPath, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code, signal) => resolve({ code: code ?? (signal === 'SIGKILL' ? 137 : 128), stdout, stderr }));
  });
}

/** The built `imagekeep` command, as a user runs it. */
export function imagekeep(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return runNode([BIN, ...args], env);
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

export async function tempDir(prefix: string, parent = tmpdir()): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(parent, `ik-${prefix}-`));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** A deterministic byte generator: AES-128-CTR keyed by the seed, so fixtures are reproducible and fast. */
export function prng(seed: number): (n: number) => Buffer {
  const key = createHash('sha256').update(`imagekeep test seed ${seed}`).digest().subarray(0, 16);
  const stream = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return (n: number) => stream.update(Buffer.alloc(n));
}

/** Overwrites `bytes` at `at` of a file in place (a test's way to damage an image). */
export async function patchFile(path: string, at: number, bytes: Uint8Array): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(bytes, 0, bytes.length, at);
  } finally {
    await fh.close();
  }
}

/** `length` bytes of a file from `at`. */
export async function readFileAt(path: string, at: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const b = Buffer.alloc(length);
    await fh.read(b, 0, length, at);
    return b;
  } finally {
    await fh.close();
  }
}
