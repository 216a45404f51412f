/**
 * Open benchmark (scripts/bench/open). Writes a synthetic chain straight with ImageWriter
 * (default: base + 999 incrementals of a 1 TiB sparse disk, 1,000 random 64 KiB blocks per
 * image, each block a repeating 16-byte pattern naming its image and block), then in a
 * fresh process opens the newest point with openPoint() and reads 1,000 blocks (half
 * written by some image, half uniformly random), checking each against the generator's
 * record (newest writer wins; never written reads as zeros). A second fresh process times
 * the steps of opening one by one. Targets (< 2 s, < 300 MiB) never fail the exit code.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { formatImageName } from '../chain/names.js';
import { KiB, Rng, checkOptions, cleanupOnSignal, fmtBytes, fmtMiB, fmtS, parseArgs, parseSize, pass, runNode, scratchDir, secs } from './common.js';
import type { PhasesReport, ReadReport, Samples } from './open-child.js';
import type { GenDone, GenImage, GenJob } from './open-gen.js';

const USAGE = `usage: scripts/bench/open [--size 1T] [--images 1000] [--blocks 1000] [--reads 1000] [--seed N] [--workers N] [--keep]
  --size     virtual disk size (binary units); default 1T
  --images   images in the chain (base + incrementals); default 1000
  --blocks   random 64 KiB blocks written by each image; default 1000
  --reads    blocks read back and checked (half written, half random); default 1000
  --seed     PRNG seed; default 1
  --workers  generator threads; default the number of cores
  --keep     keep the scratch directory ($BENCH_DIR or the system temp dir)`;

const BLOCK = 64 * KiB;
const VOLUME = 'C_VOL';
const TARGET_SECONDS = 2;
const TARGET_MIB = 300;

function distinctSorted(rng: Rng, count: number, blockCount: number): Uint32Array {
  const set = new Set<number>();
  while (set.size < count) set.add(rng.int(blockCount));
  return Uint32Array.from(set).sort();
}

async function generate(folder: string, lists: Uint32Array[], virtualSize: number, workers: number): Promise<GenDone> {
  const chainId = randomBytes(16);
  const ends = lists.map(() => randomBytes(16));
  const images: GenImage[] = lists.map((blocks, k) => ({
    number: k, blocks, parentPointId: k === 0 ? Buffer.alloc(16) : ends[k - 1]!, endPointId: ends[k]!,
  }));
  const baseTime = Date.UTC(2024, 0, 1);
  const jobs: GenJob[] = Array.from({ length: workers }, () => ({
    folder, volume: VOLUME, chainId, virtualSize, blockSize: BLOCK, baseTime, images: [],
  }));
  images.forEach((im, k) => jobs[k % workers]!.images.push(im));
  const url = new URL('./open-gen.js', import.meta.url);
  const results = await Promise.all(
    jobs.filter((j) => j.images.length > 0).map((job) => new Promise<GenDone>((resolvePromise, reject) => {
      const w = new Worker(url, { workerData: job });
      w.once('message', (d: GenDone) => resolvePromise(d));
      w.once('error', reject);
      w.once('exit', (code) => {
        if (code !== 0) reject(new Error(`generator thread exited with code ${code}`));
      });
    })),
  );
  return results.reduce((a, d) => ({
    images: a.images + d.images, records: a.records + d.records, recordBytes: a.recordBytes + d.recordBytes, fileBytes: a.fileBytes + d.fileBytes,
  }));
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2), ['keep', 'help']);
  if (args.options.has('help')) {
    console.log(USAGE);
    return;
  }
  checkOptions(args, ['size', 'images', 'blocks', 'reads', 'seed', 'workers', 'keep', 'help']);
  const virtualSize = parseSize(args.options.get('size') ?? '1T');
  const imageCount = Number(args.options.get('images') ?? 1000);
  const perImage = Number(args.options.get('blocks') ?? 1000);
  const reads = Number(args.options.get('reads') ?? 1000);
  const seed = Number(args.options.get('seed') ?? 1);
  const workers = Math.max(1, Number(args.options.get('workers') ?? availableParallelism()));
  const keep = args.options.has('keep');
  const blockCount = Math.ceil(virtualSize / BLOCK);
  if (!(imageCount >= 1 && imageCount <= 65535)) throw new Error('--images must be 1..65535');
  if (blockCount > 2 ** 32) throw new Error('--size too large for this benchmark (at most 2^32 blocks)');
  if (!(perImage >= 1 && perImage <= blockCount / 2)) throw new Error('--blocks must be between 1 and half the disk');

  const dir = await scratchDir('open');
  const cleanup = cleanupOnSignal(dir, keep);
  const folder = join(dir, 'chain');
  await mkdir(folder);
  const rng = new Rng(seed);
  const child = fileURLToPath(new URL('./open-child.js', import.meta.url));
  try {
    let t0 = performance.now();
    const lists = Array.from({ length: imageCount }, () => distinctSorted(rng, perImage, blockCount));
    const gen = await generate(folder, lists, virtualSize, workers);
    console.log(
      `generate: ${gen.images} images (${VOLUME}-b001.spf + ${gen.images - 1} incrementals) of a ${fmtBytes(virtualSize)} sparse disk, ` +
        `${perImage} random 64 KiB blocks each (${gen.records} records, ${fmtMiB(gen.recordBytes)} of records, ${fmtMiB(gen.fileBytes)} on disk) ` +
        `in ${fmtS(secs(t0))} with ${workers} threads, in ${dir}`,
    );

    // What each sampled block must read as: its newest writer, or zeros.
    const newest = new Map<number, number>();
    lists.forEach((blocks, k) => {
      for (const b of blocks) newest.set(b, k);
    });
    const samples: [number, number][] = [];
    for (let i = 0; i < reads; i++) {
      const b = i % 2 === 0 ? lists[rng.int(imageCount)]![rng.int(perImage)]! : rng.int(blockCount);
      samples.push([b, newest.get(b) ?? -1]);
    }
    rng.shuffle(samples);
    newest.clear();
    const samplesPath = join(dir, 'samples.json');
    await writeFile(samplesPath, JSON.stringify({ blockSize: BLOCK, samples } satisfies Samples));
    const image = join(folder, formatImageName({ volume: VOLUME, base: 1, last: imageCount - 1, levelBits: 0 }));

    t0 = performance.now();
    const r = JSON.parse(await runNode(child, ['read', image, samplesPath])) as ReadReport;
    const wall = secs(t0);
    const total = r.openSeconds + r.readSeconds;
    const peakMiB = r.peakKiB / 1024;
    console.log(`open: openPoint of ${formatImageName({ volume: VOLUME, base: 1, last: imageCount - 1, levelBits: 0 })} (${r.layers} layers) in ${fmtS(r.openSeconds)} (fresh process, files in the page cache)`);
    console.log(
      `open reads: ${r.reads} random 64 KiB blocks (${r.dataReads} hold data, ${r.reads - r.dataReads} never written: zeros) in ${fmtS(r.readSeconds)} ` +
        `= ${((r.readSeconds / r.reads) * 1e6).toFixed(0)} us/block; ${r.mismatches} mismatches${r.firstMismatch ? ` (first: ${r.firstMismatch})` : ''}`,
    );
    console.log(`open total: ${fmtS(total)} open + reads (child wall ${fmtS(wall)} incl. node startup) (target < ${TARGET_SECONDS} s: ${pass(total < TARGET_SECONDS)})`);
    console.log(
      `open memory: peak RSS ${peakMiB.toFixed(0)} MiB (VmHWM; maxRSS ${(r.maxRssKiB / 1024).toFixed(0)} MiB; node alone ${(r.baselineKiB / 1024).toFixed(0)} MiB) ` +
        `(target < ${TARGET_MIB} MiB: ${pass(peakMiB < TARGET_MIB)})`,
    );

    const p = JSON.parse(await runNode(child, ['phases', image])) as PhasesReport;
    let prev = p.baselineKiB;
    const parts = p.phases.map((ph) => {
      const s = `${ph.name} ${fmtS(ph.seconds)}, RSS ${ph.rssKiB - prev >= 0 ? '+' : ''}${((ph.rssKiB - prev) / 1024).toFixed(0)} MiB`;
      prev = ph.rssKiB;
      return s;
    });
    console.log(`open phases (second fresh process, node alone ${(p.baselineKiB / 1024).toFixed(0)} MiB, peak ${(p.peakKiB / 1024).toFixed(0)} MiB): ${parts.join('; ')}`);
    if (r.mismatches > 0) process.exitCode = 1;
  } finally {
    await cleanup();
    if (keep) console.log(`kept ${dir}`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? (e.stack ?? e.message) : e);
  process.exit(1);
});

