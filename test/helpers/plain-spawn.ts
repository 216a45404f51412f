// Runs node programs from a test the way a shell would, without the hook tap adds to every process a test starts.
import { spawn } from 'node:child_process';
import { BIN, type RunResult } from './cli.js';

/**
 * NODE_OPTIONS without tap's process-tracking hook. tap (@tapjs/processinfo) puts
 * `--import …/@tapjs/processinfo/…/import.mjs` into NODE_OPTIONS of every process a test
 * spawns, and puts it back if the test removes it from its environment. The hook records
 * processes for coverage, which this project turns off, and it runs every module load through
 * a loader thread: `imagekeep --version` takes 1.3 CPU-seconds with it and 0.6 without.
 */
const nodeOptions = (process.env.NODE_OPTIONS ?? '').split(/\s+/).filter((o) => o !== '' && !o.includes('@tapjs/processinfo')).join(' ');

/** `node ARGS` with `env` added to this process's environment, minus tap's hook (`env` sets NODE_OPTIONS after tap has). */
export function runNode(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn('env', [`NODE_OPTIONS=${nodeOptions}`, process.execPath, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code, signal) => resolve({ code: code ?? (signal === 'SIGKILL' ? 137 : 128), stdout, stderr }));
  });
}

/** The built `imagekeep` command, as imagekeep() in cli.ts runs it, minus tap's hook. */
export function imagekeepPlain(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return runNode([BIN, ...args], env);
}
