/**
 * Mount benchmark (scripts/bench/mount). Builds a 30-image chain: a generated disk (default
 * 1 GiB: ~1/3 random, ~1/3 text-like, ~1/3 zero, in chunks of 1-7 MiB) backed up in full,
 * then 29 incrementals after rewriting --change (1%) of the 64 KiB blocks each. The newest
 * point is exported as a dynamic VHD (`imagekeep export --format vhd`), and its disk.raw as
 * served by our FUSE server is read against vhdimount (libvhdi) serving that VHD, in the
 * same run, alternating, best of --runs:
 *   - sequential: the whole file in 1 MiB reads (dd bs=1M),
 *   - random: --random (20000) 4 KiB preads at seeded 4 KiB-aligned offsets (one process).
 * Each run mounts afresh (the kernel's page cache of a FUSE file starts empty), with the
 * image files warm in the page cache for both. The reader is always another process than
 * the server. Ratios are ours / vhdimount throughput (targets >= 1.0x); the bytes read
 * through both are compared (sha256 of the sequential pass), and a mismatch fails.
 *
 * `node dist/bench/mount.js --serve IMAGE DIR` is the server the benchmark starts: our
 * mount without depending on how the CLI is wired.
 */
import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { backup } from '../chain/backup.js';
import { KeyRing } from '../chain/image/reader.js';
import { serveImage } from '../mount/mount.js';
import { isMountPoint } from '../mount/server.js';
import {
  MiB, Rng, checkOptions, cleanupOnSignal, fmtMiB, parseArgs, parseSize, scratchDir, secs, warmCache,
} from './common.js';
import { BLOCK, contiguousChunks, rewriteBlocks, writeChangedBlocks, writeDisk } from './collapse-disk.js';

const USAGE = `usage: scripts/bench/mount [--size 1G] [--images 30] [--change 0.01] [--random 20000] [--runs 2] [--seed N] [--keep]
  --size      disk size (binary units); default 1G
  --images    images in the chain (a full and images-1 incrementals); default 30
  --change    fraction of 64 KiB blocks rewritten before each incremental; default 0.01
  --random    4 KiB random reads per run; default 20000
  --runs      timed runs of each reader (the fastest counts); default 2
  --seed      PRNG seed; default 1
  --keep      keep the scratch directory ($BENCH_DIR or the system temp dir)`;

const SELF = fileURLToPath(import.meta.url);
const CLI = fileURLToPath(new URL('../../bin/imagekeep.js', import.meta.url));
const T0 = Date.UTC(2024, 0, 1);

function exec(cmd: string, args: string[], opts: { detached?: boolean } = {}): Promise<{ code: number; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: opts.detached });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? 1, out }));
  });
}

async function waitMounted(dir: string, what: string): Promise<void> {
  for (let i = 0; !(await isMountPoint(dir)); i++) {
    if (i > 3000) throw new Error(`${what} did not mount ${dir}`);
    await sleep(10);
  }
}

async function unmountDir(dir: string): Promise<void> {
  for (let i = 0; (await isMountPoint(dir)) && i < 50; i++) {
    await exec('fusermount', ['-u', dir]);
    if (await isMountPoint(dir)) await sleep(100);
  }
  if (await isMountPoint(dir)) await exec('fusermount', ['-uz', dir]);
}

interface Reader {
  name: string;
  mount(): Promise<string>;
  unmount(): Promise<void>;
}

// 4 KiB preads at seeded aligned offsets, synchronous: this process is not the server.
const RANDOM = `
const fs = require('node:fs');
const [path, count, seed] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3])];
const size = fs.statSync(path).size;
const pages = Math.floor(size / 4096);
let x = seed >>> 0;
const buf = Buffer.alloc(4096);
const fd = fs.openSync(path, 'r');
const t0 = process.hrtime.bigint();
let sum = 0;
for (let i = 0; i < count; i++) {
  x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
  const page = Math.floor((x / 4294967296) * pages);
  fs.readSync(fd, buf, 0, 4096, page * 4096);
  sum = (sum + buf[0] + buf[4095]) >>> 0;
}
console.log(JSON.stringify({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, sum }));
`;

async function sequential(file: string): Promise<{ seconds: number; sha: string }> {
  const t0 = performance.now();
  const r = await exec('sh', ['-c', `dd if='${file}' bs=1M status=none | sha256sum`]);
  if (r.code !== 0) throw new Error(`reading ${file}: ${r.out}`);
  return { seconds: secs(t0), sha: r.out.split(' ')[0]! };
}

async function random(file: string, count: number, seed: number): Promise<{ seconds: number; sum: number }> {
  const r = await exec(process.execPath, ['-e', RANDOM, file, String(count), String(seed)]);
  if (r.code !== 0) throw new Error(`random reads of ${file}: ${r.out}`);
  return JSON.parse(r.out) as { seconds: number; sum: number };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv[0] === '--serve') {
    const ac = new AbortController();
    for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => ac.abort());
    await serveImage({ image: argv[1]!, dir: argv[2]!, keyring: new KeyRing(null), files: false, owner: false, log: (l) => process.stderr.write(`${l}\n`), signal: ac.signal });
    process.exit(0);
  }
  const args = parseArgs(argv, ['keep', 'help']);
  if (args.options.has('help')) { console.log(USAGE); return; }
  checkOptions(args, ['size', 'images', 'change', 'random', 'runs', 'seed', 'keep', 'help']);
  const size = parseSize(args.options.get('size') ?? '1G');
  const images = Number(args.options.get('images') ?? 30);
  const change = Number(args.options.get('change') ?? 0.01);
  const randomCount = Number(args.options.get('random') ?? 20000);
  const runs = Number(args.options.get('runs') ?? 2);
  const seed = Number(args.options.get('seed') ?? 1);
  const dir = await scratchDir('mount');
  const clean = cleanupOnSignal(dir, args.options.has('keep'));
  const mounts: string[] = [];
  try {
    const rng = new Rng(seed);
    const disk = join(dir, 'disk.raw');
    const folder = join(dir, 'backups');
    let t0 = performance.now();
    await writeDisk(disk, size, contiguousChunks(size, rng, ['random', 'text', 'zero']), rng);
    let last = (await backup(disk, folder, { at: T0, forensic: true })).path;
    const blockCount = Math.ceil(size / BLOCK);
    for (let n = 1; n < images; n++) {
      const blocks = [...new Set(Array.from({ length: Math.max(1, Math.round(blockCount * change)) }, () => rng.int(blockCount)))].sort((x, y) => x - y);
      await rewriteBlocks(disk, size, blocks);
      const cbt = join(dir, 'changed.txt');
      await writeChangedBlocks(cbt, blocks, size);
      last = (await backup(disk, folder, { at: T0 + n * 3600_000, forensic: true, changedBlocksFile: cbt })).path;
    }
    console.log(`chain: ${images} images of a ${fmtMiB(size)} disk (${(change * 100).toFixed(1)}% of blocks rewritten per incremental) built in ${secs(t0).toFixed(1)} s; point ${last.split('/').pop()}`);
    const vhd = join(dir, 'point.vhd');
    t0 = performance.now();
    const ex = await exec(process.execPath, [CLI, 'export', last, vhd, '--format', 'vhd', '--subformat', 'dynamic']);
    if (ex.code !== 0) throw new Error(`export: ${ex.out}`);
    console.log(`exported as a dynamic VHD in ${secs(t0).toFixed(1)} s`);
    const { readdir } = await import('node:fs/promises');
    for (const f of await readdir(folder)) await warmCache(join(folder, f));
    await warmCache(vhd);

    const ourDir = join(dir, 'mnt-ours');
    const vhdDir = join(dir, 'mnt-vhd');
    await mkdir(ourDir);
    await mkdir(vhdDir);
    mounts.push(ourDir, vhdDir);
    const ours: Reader = {
      name: 'imagekeep',
      mount: async () => {
        const p = spawn(process.execPath, [SELF, '--serve', last, ourDir], { stdio: ['ignore', 'ignore', 'inherit'], detached: true });
        p.unref();
        await waitMounted(ourDir, 'imagekeep');
        return join(ourDir, 'disk.raw');
      },
      unmount: () => unmountDir(ourDir),
    };
    const theirs: Reader = {
      name: 'vhdimount',
      mount: async () => {
        const r = await exec('vhdimount', [vhd, vhdDir]);
        if (r.code !== 0) throw new Error(`vhdimount: ${r.out}`);
        await waitMounted(vhdDir, 'vhdimount');
        return join(vhdDir, 'vhdi1');
      },
      unmount: () => unmountDir(vhdDir),
    };

    const best = new Map<string, { seq: number; rnd: number; sha: string; sum: number }>();
    for (let run = 0; run < runs; run++) {
      for (const r of run % 2 === 0 ? [ours, theirs] : [theirs, ours]) {
        let file = await r.mount();
        const s = await sequential(file);
        await r.unmount();
        file = await r.mount();
        const q = await random(file, randomCount, seed + run);
        await r.unmount();
        const b = best.get(r.name);
        best.set(r.name, { seq: Math.min(b?.seq ?? Infinity, s.seconds), rnd: Math.min(b?.rnd ?? Infinity, q.seconds), sha: s.sha, sum: q.sum });
        console.log(`  run ${run + 1} ${r.name.padEnd(9)} sequential 1 MiB: ${(size / MiB / s.seconds).toFixed(0)} MiB/s; random 4 KiB: ${(randomCount / q.seconds).toFixed(0)} reads/s`);
      }
    }
    const a = best.get('imagekeep')!;
    const v = best.get('vhdimount')!;
    const same = a.sha === v.sha && a.sum === v.sum;
    console.log(`sequential 1 MiB: imagekeep ${(size / MiB / a.seq).toFixed(0)} MiB/s, vhdimount ${(size / MiB / v.seq).toFixed(0)} MiB/s, ratio ${(v.seq / a.seq).toFixed(2)}x (target >= 1.0x) ${v.seq / a.seq >= 1 ? 'PASS' : 'MISS'}`);
    console.log(`random 4 KiB:     imagekeep ${(randomCount / a.rnd).toFixed(0)} reads/s (${(randomCount * 4096 / MiB / a.rnd).toFixed(1)} MiB/s), vhdimount ${(randomCount / v.rnd).toFixed(0)} reads/s, ratio ${(v.rnd / a.rnd).toFixed(2)}x (target >= 1.0x) ${v.rnd / a.rnd >= 1 ? 'PASS' : 'MISS'}`);
    console.log(`same bytes through both: ${same ? 'yes' : 'NO'} (sha256 ${a.sha.slice(0, 16)}…)`);
    if (!same) process.exitCode = 1;
  } finally {
    for (const m of mounts) await unmountDir(m).catch(() => undefined);
    await clean();
  }
}

await main();
