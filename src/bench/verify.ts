/**
 * Verification benchmark (scripts/bench/verify). Builds a backup folder: a generated disk
 * (default 4 GiB: ~1/3 random, ~1/3 text-like, ~1/3 zero, in chunks of 1-7 MiB) backed up
 * in full, then --incrementals (4) incrementals after rewriting --change (5%) of the 64 KiB
 * blocks each with random data (taken with --changed-blocks). Then times, over all image
 * files of the folder, each run after reading every file once (page cache warm for all),
 * ours and md5sum alternating, best of --runs:
 *   - `md5sum FILE…` (one process, files in turn),
 *   - our quick verify in-process: quickVerify(path) per file, in turn (MD5 vs .md5),
 *   - our deep verify in-process: deepVerify(path, keyring) per file (every record decoded
 *     and checked against its digest, then the quick check),
 * and once each the CLI `node bin/imagekeep.js verify FOLDER [--deep]` (node start-up,
 * folder lock and state store included). MiB/s = image bytes / seconds. Targets never
 * fail the exit code; a file that does not verify does.
 */
import { rm, stat } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backup } from '../chain/backup.js';
import { listFolder } from '../chain/folder.js';
import { ImageFile, KeyRing } from '../chain/image/reader.js';
import { deepCheck, deepVerify, quickVerify, type FileCheck } from '../chain/verify.js';
import {
  Rng, checkOptions, cleanupOnSignal, fmtBytes, fmtMiB, fmtS, mibps, parseArgs, parseSize, pass, scratchDir, secs, timeShell,
  warmCache, type Shell,
} from './common.js';
import { BLOCK, contiguousChunks, rewriteBlocks, writeChangedBlocks, writeDisk } from './collapse-disk.js';

const USAGE = `usage: scripts/bench/verify [--size 4G] [--incrementals 4] [--change 0.05] [--runs 3] [--seed N] [--keep]
  --size          disk size (binary units); default 4G
  --incrementals  incrementals after the full; default 4
  --change        fraction of 64 KiB blocks rewritten (random data) before each incremental; default 0.05
  --runs          timed runs of md5sum, quick and deep (the fastest counts); default 3
  --seed          PRNG seed; default 1
  --keep          keep the scratch directory ($BENCH_DIR or the system temp dir)`;

const T0 = Date.UTC(2024, 0, 1);
const CLI = fileURLToPath(new URL('../../bin/imagekeep.js', import.meta.url));

function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

interface Timed {
  seconds: number;
  cpu: number;
  checks: FileCheck[];
}

async function warmAll(paths: string[]): Promise<void> {
  for (const p of paths) await warmCache(p);
}

async function timedOurs(paths: string[], check: (p: string) => Promise<FileCheck>): Promise<Timed> {
  await warmAll(paths);
  const cpu = process.cpuUsage();
  const t0 = performance.now();
  const checks: FileCheck[] = [];
  for (const p of paths) checks.push(await check(p));
  const seconds = secs(t0);
  const used = process.cpuUsage(cpu);
  const bad = checks.filter((c) => !c.ok);
  if (bad.length > 0) throw new Error(`verify failed: ${bad.map((c) => `${c.name}: ${c.reason}`).join('; ')}`);
  return { seconds, cpu: (used.user + used.system) / 1e6, checks };
}

async function timedPeer(paths: string[], command: string): Promise<Shell> {
  await warmAll(paths);
  return timeShell(command);
}

function best<T extends { seconds: number }>(runs: T[]): T {
  return runs.reduce((a, b) => (b.seconds < a.seconds ? b : a));
}
function spread(runs: { seconds: number }[]): string {
  return runs.length === 1 ? '1 run' : `best of ${runs.length}: ${runs.map((r) => r.seconds.toFixed(2)).join('/')} s`;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2), ['keep', 'help']);
  if (args.options.has('help')) {
    console.log(USAGE);
    return;
  }
  checkOptions(args, ['size', 'incrementals', 'change', 'runs', 'seed', 'keep', 'help']);
  const size = parseSize(args.options.get('size') ?? '4G');
  const incCount = Number(args.options.get('incrementals') ?? 4);
  const change = Number(args.options.get('change') ?? 0.05);
  const runs = Number(args.options.get('runs') ?? 3);
  const seed = Number(args.options.get('seed') ?? 1);
  const keep = args.options.has('keep');
  if (size % BLOCK !== 0) throw new Error('--size must be a multiple of 64K');
  if (!(Number.isInteger(runs) && runs >= 1)) throw new Error('--runs must be a positive integer');
  if (!(Number.isInteger(incCount) && incCount >= 0)) throw new Error('--incrementals must be 0 or more');

  const dir = await scratchDir('verify');
  const cleanup = cleanupOnSignal(dir, keep);
  const raw = join(dir, 'disk.raw');
  const folder = join(dir, 'backups');
  const rng = new Rng(seed);
  try {
    let t0 = performance.now();
    const chunks = contiguousChunks(size, rng, ['random', 'text', 'zero']);
    const kinds = await writeDisk(raw, size, chunks, rng);
    const pct = (n: number) => `${Math.round((n / size) * 100)}%`;
    const genSeconds = secs(t0);
    t0 = performance.now();
    await backup(raw, folder, { at: T0, forensic: true });
    const fullSeconds = secs(t0);
    t0 = performance.now();
    const blockCount = size / BLOCK;
    const perInc = Math.max(1, Math.round(blockCount * change));
    for (let k = 1; k <= incCount; k++) {
      const set = new Set<number>();
      while (set.size < perInc) set.add(rng.int(blockCount));
      const blocks = [...set].sort((a, b) => a - b);
      await rewriteBlocks(raw, size, blocks);
      const changed = join(dir, 'changed.txt');
      await writeChangedBlocks(changed, blocks, size);
      await backup(raw, folder, { at: T0 + k * 3600_000, forensic: true, changedBlocksFile: changed });
    }
    const incSeconds = secs(t0);
    await rm(raw);
    await timeShell('sync');

    const paths = (await listFolder(folder)).images.map((i) => i.path);
    const sizes = await Promise.all(paths.map(async (p) => (await stat(p)).size));
    const total = sizes.reduce((a, b) => a + b, 0);
    console.log(
      `generate: ${fmtBytes(size)} disk (random ${pct(kinds.random)}, text ${pct(kinds.text)}, zero ${pct(kinds.zero)}; seed ${seed}) in ${fmtS(genSeconds)}; ` +
        `full backup ${fmtS(fullSeconds)}, ${incCount} incrementals (${(change * 100).toFixed(1)}% random rewrites each) ${fmtS(incSeconds)}; ` +
        `folder: ${paths.length} images, ${fmtMiB(total)} (${sizes.map((s) => fmtMiB(s)).join(' + ')}), in ${dir}`,
    );

    const md5Cmd = `md5sum ${paths.map(shq).join(' ')}`;
    const peer: Shell[] = [];
    const quick: Timed[] = [];
    for (let r = 0; r < runs; r++) {
      peer.push(await timedPeer(paths, md5Cmd));
      quick.push(await timedOurs(paths, quickVerify));
    }
    // Sanity: md5sum and our check agree on every file.
    const sums = new Map(peer[0]!.stdout.trim().split('\n').map((l) => [l.slice(34), l.slice(0, 32)] as const));
    for (const c of quick[0]!.checks) {
      const p = paths.find((x) => x.endsWith(`/${c.name}`))!;
      if (sums.get(p) !== c.md5) throw new Error(`${c.name}: md5sum says ${sums.get(p)}, quickVerify ${c.md5}`);
    }
    const q = best(quick);
    const m = best(peer);
    const ratio = m.seconds / q.seconds;
    console.log(
      `verify quick: ${paths.length} files, ${fmtMiB(total)}: ours (in-process quickVerify per file) ${fmtS(q.seconds)} = ${mibps(total, q.seconds)} ` +
        `(${spread(quick)}; CPU ${fmtS(q.cpu)}); md5sum FILES: ${fmtS(m.seconds)} = ${mibps(total, m.seconds)} (${spread(peer)}; CPU ${fmtS(m.cpu)}); ` +
        `ratio ours/md5sum ${ratio.toFixed(2)} (target >= 0.9: ${pass(ratio >= 0.9)}; by CPU seconds ${(m.cpu / q.cpu).toFixed(2)}); load average ${loadavg()[0]!.toFixed(2)}`,
    );

    const keyring = new KeyRing(null);
    const deep: Timed[] = [];
    for (let r = 0; r < runs; r++) deep.push(await timedOurs(paths, (p) => deepVerify(p, keyring)));
    const d = best(deep);
    // Its two passes apart: the block checks alone (the rest is the quick MD5 pass).
    await warmAll(paths);
    t0 = performance.now();
    for (const p of paths) {
      const image = await ImageFile.open(p, keyring);
      try {
        await deepCheck(image);
      } finally {
        await image.close();
      }
    }
    const blocksOnly = secs(t0);
    console.log(
      `verify deep: ours (in-process deepVerify per file) ${fmtS(d.seconds)} = ${mibps(total, d.seconds)} (${spread(deep)}; CPU ${fmtS(d.cpu)}; ` +
        `block checks alone ${fmtS(blocksOnly)} = ${mibps(total, blocksOnly)}, the rest is the MD5 pass); ratio deep/quick time ${(d.seconds / q.seconds).toFixed(2)}; load average ${loadavg()[0]!.toFixed(2)}`,
    );

    await warmAll(paths);
    const cq = await timeShell(`node ${shq(CLI)} verify ${shq(folder)}`);
    await warmAll(paths);
    const cd = await timeShell(`node ${shq(CLI)} verify ${shq(folder)} --deep`);
    const summary = (s: Shell) => s.stdout.trim().split('\n').filter((l) => l.includes('checked')).pop() ?? '?';
    console.log(
      `verify CLI (1 run each, node start-up included): verify FOLDER ${fmtS(cq.seconds)} = ${mibps(total, cq.seconds)} ("${summary(cq)}"); ` +
        `verify FOLDER --deep ${fmtS(cd.seconds)} = ${mibps(total, cd.seconds)} ("${summary(cd)}")`,
    );
  } finally {
    await cleanup();
    if (keep) console.log(`kept ${dir}`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
