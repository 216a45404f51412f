/**
 * Helpers shared by the benchmarks: option parsing, a seeded PRNG, scratch directories,
 * page-cache warming, timed shell commands and the number formats of the printed lines.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalFile } from '../formats/local-file.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** "512M", "4G", "1T", "65536", "64K" (binary units) to bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(text.trim());
  if (!m) throw new Error(`cannot read size "${text}" (try 512M, 4G, 1T)`);
  const unit = { '': 1, k: KiB, m: MiB, g: GiB, t: TiB }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  return Math.round(Number(m[1]) * unit);
}

export interface Args {
  /** --name value (or --name=value); flags without a value map to "true" */
  options: Map<string, string>;
  positional: string[];
}

/** Parses `--name value`, `--name=value` and bare `--flag` (known flags listed in `flags`). */
export function parseArgs(argv: string[], flags: string[] = []): Args {
  const options = new Map<string, string>();
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--')) {
      positional.push(a);
      continue;
    }
    const eq = a.indexOf('=');
    if (eq > 0) options.set(a.slice(2, eq), a.slice(eq + 1));
    else if (flags.includes(a.slice(2))) options.set(a.slice(2), 'true');
    else {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      options.set(a.slice(2), v);
    }
  }
  return { options, positional };
}

/** Refuses options the benchmark does not know, so a typo does not silently run 4 GiB. */
export function checkOptions(args: Args, known: string[]): void {
  for (const k of args.options.keys()) if (!known.includes(k)) throw new Error(`unknown option --${k} (known: ${known.map((x) => `--${x}`).join(' ')})`);
}

/** sfc32 PRNG: fast, seeded, good enough for test data (not for keys). */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  constructor(seed: number) {
    this.a = 0x9e3779b9;
    this.b = 0x243f6a88;
    this.c = 0xb7e15162;
    this.d = seed >>> 0;
    for (let i = 0; i < 16; i++) this.u32();
  }

  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** uniform in [0, 1) */
  float(): number {
    return this.u32() / 4294967296;
  }

  /** uniform integer in [0, n), n up to 2^53 */
  int(n: number): number {
    if (n <= 4294967296) return Math.floor(this.float() * n);
    return Math.floor((this.u32() * 4294967296 + this.u32()) / 18446744073709551616 * n);
  }

  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [a[i], a[j]] = [a[j]!, a[i]!];
    }
    return a;
  }
}

/** A fresh scratch directory under $BENCH_DIR (or the system temp dir). */
export async function scratchDir(tag: string): Promise<string> {
  return mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), `imagekeep-bench-${tag}-`));
}

/** Removes the scratch directory on exit paths, including Ctrl-C. */
export function cleanupOnSignal(dir: string, keep: boolean): () => Promise<void> {
  let done = false;
  const clean = async () => {
    if (done || keep) return;
    done = true;
    await rm(dir, { recursive: true, force: true });
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      void clean().finally(() => process.exit(130));
    });
  }
  return clean;
}

/** Reads a file once, start to end, so the timed runs read it from the page cache. */
export async function warmCache(path: string): Promise<number> {
  const f = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 * MiB);
    let at = 0;
    for (;;) {
      const { bytesRead } = await f.read(buf, 0, buf.length, at);
      if (bytesRead === 0) break;
      at += bytesRead;
    }
    return at;
  } finally {
    await f.close();
  }
}

/** fsync of one file (so its dirty pages do not get written back during a later timing). */
export async function fsyncFile(path: string): Promise<void> {
  const f = await open(path, 'r+');
  try {
    await f.sync();
  } finally {
    await f.close();
  }
}

export interface Shell {
  seconds: number;
  /** user + system CPU seconds of the command's processes (bash's `times`) */
  cpu: number;
  stdout: string;
}

/** Runs `bash -c command` (pipefail), returns wall and CPU seconds and stdout; throws with stderr on failure. */
export async function timeShell(command: string): Promise<Shell> {
  const t0 = performance.now();
  const TIMES = '\n--times--\n';
  const script = `${command}\nrc=$?; echo; echo --times--; times; exit $rc`;
  return new Promise((resolvePromise, reject) => {
    const child = spawn('bash', ['-o', 'pipefail', '-c', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => {
      const seconds = (performance.now() - t0) / 1000;
      if (code !== 0) {
        reject(new Error(`"${command}" failed (exit ${code}): ${err.trim()}`));
        return;
      }
      const at = out.lastIndexOf(TIMES);
      // `times`: the shell's user/sys, then its children's: "0m12.345s 0m0.678s"
      const children = at < 0 ? '' : (out.slice(at + TIMES.length).trim().split('\n')[1] ?? '');
      const cpu = [...children.matchAll(/(\d+)m([\d.]+)s/g)].reduce((a, m) => a + Number(m[1]) * 60 + Number(m[2]), 0);
      resolvePromise({ seconds, cpu, stdout: at < 0 ? out : out.slice(0, at) });
    });
  });
}

/** Runs `node script args…` as a fresh process and returns its stdout (stderr passes through). */
export async function runNode(script: string, args: string[]): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolvePromise(out);
      else reject(new Error(`node ${script} exited with code ${code}`));
    });
  });
}

/** Peak resident set of this process in KiB: VmHWM from /proc when present, else maxRSS. */
export async function peakRssKiB(): Promise<number> {
  const status = await readFile('/proc/self/status', 'utf8').catch(() => '');
  const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
  return m ? Number(m[1]) : process.resourceUsage().maxRSS;
}

export function secs(t0: number): number {
  return (performance.now() - t0) / 1000;
}

export function fmtS(s: number): string {
  return `${s.toFixed(2)} s`;
}

export function fmtMiB(bytes: number): string {
  const m = bytes / MiB;
  return `${m >= 100 ? m.toFixed(0) : m.toFixed(1)} MiB`;
}

/** Bytes in the largest binary unit that keeps the number at least 1: "1 TiB", "66.9 MiB". */
export function fmtBytes(bytes: number): string {
  const units: [string, number][] = [['TiB', TiB], ['GiB', GiB], ['MiB', MiB], ['KiB', KiB]];
  for (const [name, unit] of units) {
    if (bytes >= unit) {
      const v = bytes / unit;
      return `${Number.isInteger(v) ? v : v.toFixed(1)} ${name}`;
    }
  }
  return `${bytes} B`;
}

export function mibps(bytes: number, seconds: number): string {
  return `${(bytes / MiB / seconds).toFixed(0)} MiB/s`;
}

export function pass(ok: boolean): string {
  return ok ? 'ok' : 'MISSED';
}

/** Time spent in LocalFile.flush (fsyncs of images and sidecars) while a benchmark runs. */
export const fsyncClock = { seconds: 0 };

export function instrumentFsync(): void {
  const flush = LocalFile.prototype.flush;
  LocalFile.prototype.flush = async function (this: LocalFile): Promise<void> {
    const t0 = performance.now();
    try {
      await flush.call(this);
    } finally {
      fsyncClock.seconds += secs(t0);
    }
  };
}
