/**
 * Collapse benchmark (scripts/bench/collapse). A sparse disk (default 4 GiB, 1 GiB of
 * mixed random/text chunks spread over it) gets a full backup, then --hours (24) hourly
 * incrementals, each after rewriting --change (1%) of the 64 KiB blocks with random data
 * (half the hour's blocks from a hot set of 2% of the disk, so hours overlap; half
 * uniform), taken with --changed-blocks so only the changed ranges are read. Timed, each
 * from a warm page cache after `sync`, ours and qemu alternating, best of --runs:
 *   - ours: in-process collapse() of i001..i024 into C_VOL-b001-i024-cd.spi (merge of the
 *     indexes, records copied, commit with fsync + .md5, read-back deep check);
 *   - peer: the same writes replayed into a qcow2 chain (base.qcow2 converted from the
 *     hour-0 raw, ov01..ov24 each `qemu-img create -b prev`, the hour's blocks written with
 *     one `qemu-io` per hour running `write -s <block file> OFF 64k` per block), timed
 *     `qemu-img commit -q -b ov01.qcow2 ov24.qcow2` (default cache=writeback, flushed at
 *     close): ov02..ov24 merged into ov01. The chain is restored from a copy between runs.
 * MiB/s for both = merged data (unique changed blocks × 64 KiB) / seconds. Then the export
 * of the -cd (CLI) is checked against the hour-24 disk by sha256, and our collapse is run
 * again on a --big (64 GiB) disk with the same number of blocks per hour spread over it.
 * Targets never fail the exit code; a wrong export does.
 */
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backup } from '../chain/backup.js';
import { collapse, type CollapseResult } from '../chain/collapse.js';
import { groupChains, listFolder, loadChain, type ChainFile } from '../chain/folder.js';
import { LEVEL_BITS } from '../chain/image/layout.js';
import { ImageFile } from '../chain/image/reader.js';
import { dependencyPath } from '../chain/path.js';
import { sidecarPathFor } from '../chain/sidecar.js';
import { deepCheck, md5OfFile } from '../chain/verify.js';
import {
  fsyncClock,
  instrumentFsync,
  Rng, checkOptions, cleanupOnSignal, fmtBytes, fmtMiB, fmtS, mibps, parseArgs, parseSize, pass, scratchDir, secs,
  timeShell, warmCache, type Shell,
} from './common.js';
import { BLOCK, pickHours, rewriteBlocks, spreadChunks, writeChangedBlocks, writeDisk } from './collapse-disk.js';

const USAGE = `usage: scripts/bench/collapse [--size 4G] [--big 64G] [--base 1G] [--hours 24] [--change 0.01] [--hot 0.02] [--runs 3] [--seed N] [--keep]
  --size    virtual disk of the main run (ours vs qemu-img commit); default 4G
  --big     virtual disk of the scale run (ours only, same blocks per hour); 0 skips it; default 64G
  --base    bytes of base data (random and text chunks of 1-7 MiB spread over the disk); default 1G
  --hours   incrementals collapsed into one -cd; default 24
  --change  fraction of the --size disk's 64 KiB blocks rewritten each hour; default 0.01
  --hot     hot set (fraction of the --size disk's blocks) that half of each hour's writes come from; default 0.02
  --runs    timed runs of ours and of qemu-img commit (the fastest counts); default 3
  --seed    PRNG seed of positions and text; default 1
  --keep    keep the scratch directory ($BENCH_DIR or the system temp dir)`;

const VOLUME = 'C_VOL';
const HOUR = 3600_000;
const T0 = Date.UTC(2024, 0, 1, 0, 0, 0);
const CLI = fileURLToPath(new URL('../../bin/imagekeep.js', import.meta.url));


interface Scenario {
  dir: string;
  size: number;
  raw: string;
  folder: string;
  hours: number[][];
  writes: number;
  unique: number;
  sources: ChainFile[];
  /** qcow2 chain, when built */
  qemu: { dir: string; overlays: string[]; pristine: string } | null;
}

function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

async function sync(): Promise<void> {
  await timeShell('sync');
}

/** Base disk, full backup, the hourly rewrites with an incremental each (and the qcow2 replay). */
async function build(dir: string, size: number, baseBytes: number, hours: number[][], rng: Rng, withQemu: boolean): Promise<Scenario> {
  const raw = join(dir, 'disk.raw');
  const folder = join(dir, 'backups');
  await mkdir(dir, { recursive: true });
  let t0 = performance.now();
  const chunks = spreadChunks(size, baseBytes, rng, ['random', 'text']);
  const kinds = await writeDisk(raw, size, chunks, rng);
  const genSeconds = secs(t0);

  let qemu: Scenario['qemu'] = null;
  let qemuSeconds = 0;
  let prevQcow = '';
  if (withQemu) {
    const qdir = join(dir, 'qcow2');
    if (/\s/.test(qdir)) throw new Error(`qemu-io commands cannot name files under ${qdir} (whitespace): choose another $BENCH_DIR`);
    await mkdir(qdir);
    prevQcow = join(qdir, 'base.qcow2');
    t0 = performance.now();
    await timeShell(`qemu-img convert -f raw -O qcow2 ${shq(raw)} ${shq(prevQcow)}`);
    qemuSeconds += secs(t0);
    qemu = { dir: qdir, overlays: [], pristine: join(qdir, 'pristine') };
  }

  t0 = performance.now();
  const full = await backup(raw, folder, { at: T0, forensic: true, volume: VOLUME });
  const fullSeconds = secs(t0);

  let incSeconds = 0;
  let incBytes = 0;
  const seen = new Set<number>();
  let writes = 0;
  for (let h = 0; h < hours.length; h++) {
    const blocks = hours[h]!;
    writes += blocks.length;
    for (const b of blocks) seen.add(b);
    const copyDir = qemu ? join(dir, 'hour-blocks') : undefined;
    const files = await rewriteBlocks(raw, size, blocks, copyDir);
    const changed = join(dir, 'changed.txt');
    await writeChangedBlocks(changed, blocks, size);
    t0 = performance.now();
    const r = await backup(raw, folder, { at: T0 + (h + 1) * HOUR, forensic: true, changedBlocksFile: changed });
    incSeconds += secs(t0);
    incBytes += r.imageBytes;
    if (r.kind !== 'incremental' || r.number !== h + 1) throw new Error(`expected incremental ${h + 1}, got ${r.kind} ${r.number}`);
    if (r.bytesRead !== blocks.length * BLOCK) throw new Error(`incremental ${h + 1} read ${r.bytesRead} bytes, expected ${blocks.length * BLOCK}`);
    if (qemu && copyDir) {
      const ov = join(qemu.dir, `ov${String(h + 1).padStart(2, '0')}.qcow2`);
      const cmds = join(dir, 'qemu-io.txt');
      await writeFile(cmds, blocks.map((b, i) => `write -q -s ${files[i]} ${b * BLOCK} ${BLOCK}`).join('\n') + '\n');
      t0 = performance.now();
      await timeShell(`qemu-img create -q -f qcow2 -b ${shq(prevQcow)} -F qcow2 ${shq(ov)} && qemu-io -f qcow2 ${shq(ov)} < ${shq(cmds)} > /dev/null`);
      qemuSeconds += secs(t0);
      qemu.overlays.push(ov);
      prevQcow = ov;
      await rm(copyDir, { recursive: true, force: true });
    }
  }
  console.log(
    `build ${fmtBytes(size)}: base data ${fmtMiB(kinds.random + kinds.text)} (random ${fmtMiB(kinds.random)}, text ${fmtMiB(kinds.text)}, ${chunks.length} chunks spread over the disk) ` +
      `in ${fmtS(genSeconds)}; full backup ${fmtS(fullSeconds)} (image ${fmtMiB(full.imageBytes)}); ${hours.length} incrementals with --changed-blocks ` +
      `${fmtS(incSeconds)} (${fmtMiB(incBytes)} of images)` +
      (qemu ? `; qcow2 chain (convert + ${hours.length} overlays via qemu-io write -s per block) ${fmtS(qemuSeconds)}` : ''),
  );

  if (qemu) {
    await timeShell(`mkdir -p ${shq(qemu.pristine)} && cp --sparse=always ${qemu.overlays.map(shq).join(' ')} ${shq(qemu.pristine)}/`);
  }
  const files = (await loadChain(groupChains((await listFolder(folder)).images).get(`${VOLUME}-b001`)!)).files;
  const top = files.find((f) => f.last === hours.length && f.levelBits === 0)!;
  const sources = dependencyPath(top, files).filter((f) => f.last >= 1);
  await sync();
  return { dir, size, raw, folder, hours, writes, unique: seen.size, sources, qemu };
}

interface Timed {
  seconds: number;
  cpu: number;
  fsync: number;
  mainBusy: number;
  result: CollapseResult;
}

async function timedCollapse(s: Scenario): Promise<Timed> {
  await sync();
  for (const f of s.sources) await warmCache(f.path);
  fsyncClock.seconds = 0;
  const elu = performance.eventLoopUtilization();
  const cpu = process.cpuUsage();
  const t0 = performance.now();
  const result = await collapse(s.folder, s.sources, { first: 1, last: s.hours.length, levelBits: LEVEL_BITS.cd }, { now: T0 + (s.hours.length + 1) * HOUR });
  const seconds = secs(t0);
  const used = process.cpuUsage(cpu);
  return { seconds, cpu: (used.user + used.system) / 1e6, fsync: fsyncClock.seconds, mainBusy: performance.eventLoopUtilization(elu).utilization, result };
}

async function removeOutput(t: Timed): Promise<void> {
  await rm(t.result.path);
  await rm(sidecarPathFor(t.result.path));
}

async function timedCommit(s: Scenario): Promise<Shell> {
  const q = s.qemu!;
  // Every run starts from the chain as the replay left it.
  await timeShell(`cp --sparse=always ${q.overlays.map((o) => shq(join(q.pristine, o.slice(q.dir.length + 1)))).join(' ')} ${shq(q.dir)}/`);
  await sync();
  for (const o of q.overlays) await warmCache(o);
  return timeShell(`qemu-img commit -q -b ${shq(q.overlays[0]!)} ${shq(q.overlays[q.overlays.length - 1]!)}`);
}

function best<T extends { seconds: number }>(runs: T[]): T {
  return runs.reduce((a, b) => (b.seconds < a.seconds ? b : a));
}
function spread(runs: { seconds: number }[]): string {
  return runs.length === 1 ? '1 run' : `best of ${runs.length}: ${runs.map((r) => r.seconds.toFixed(2)).join('/')} s`;
}

/** The read-back deep check of the output alone (warm cache), to show its share of a collapse. */
async function timeReadBack(path: string): Promise<number> {
  await warmCache(path);
  const image = await ImageFile.open(path);
  try {
    const t0 = performance.now();
    await deepCheck(image);
    return secs(t0);
  } finally {
    await image.close();
  }
}

/** MD5 of the output alone (warm cache): what its `.md5` sidecar costs, whoever computes it. */
async function timeMd5(path: string, expected: string): Promise<number> {
  await warmCache(path);
  const t0 = performance.now();
  const md5 = await md5OfFile(path);
  const seconds = secs(t0);
  if (md5 !== expected) throw new Error(`the output's MD5 is ${md5}, its sidecar says ${expected}`);
  return seconds;
}

function detail(t: Timed, readBack: number): string {
  return `CPU ${fmtS(t.cpu)}, output ${fmtMiB(t.result.bytes)}, fsync ${fmtS(t.fsync)}, main thread busy ${Math.round(t.mainBusy * 100)}%, ` +
    `read-back deep check alone ${fmtS(readBack)}`;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2), ['keep', 'help']);
  if (args.options.has('help')) {
    console.log(USAGE);
    return;
  }
  checkOptions(args, ['size', 'big', 'base', 'hours', 'change', 'hot', 'runs', 'seed', 'keep', 'help']);
  const size = parseSize(args.options.get('size') ?? '4G');
  const bigText = args.options.get('big') ?? '64G';
  const big = bigText === '0' ? 0 : parseSize(bigText);
  const baseBytes = parseSize(args.options.get('base') ?? '1G');
  const hourCount = Number(args.options.get('hours') ?? 24);
  const change = Number(args.options.get('change') ?? 0.01);
  const hot = Number(args.options.get('hot') ?? 0.02);
  const runs = Number(args.options.get('runs') ?? 3);
  const seed = Number(args.options.get('seed') ?? 1);
  const keep = args.options.has('keep');
  if (size % BLOCK !== 0 || (big && big % BLOCK !== 0)) throw new Error('--size and --big must be multiples of 64K');
  if (!(Number.isInteger(hourCount) && hourCount >= 2 && hourCount <= 99)) throw new Error('--hours must be 2..99');
  if (!(Number.isInteger(runs) && runs >= 1)) throw new Error('--runs must be a positive integer');
  if (baseBytes > size / 2) throw new Error('--base must be at most half of --size');
  const blockCount = size / BLOCK;
  const perHour = Math.max(2, Math.round(blockCount * change));
  const hotCount = Math.max(perHour, Math.round(blockCount * hot));
  if (perHour + hotCount > blockCount / 2) throw new Error('--change and --hot are too large for --size');

  const root = await scratchDir('collapse');
  const cleanup = cleanupOnSignal(root, keep);
  instrumentFsync();
  try {
    console.log(
      `setup: ${fmtBytes(size)} disk, ${hourCount} hours x ${perHour} random 64 KiB blocks (${(change * 100).toFixed(1)}%, half from a hot set of ${hotCount} blocks), ` +
        `seed ${seed}, in ${root}; load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}`,
    );
    const rng = new Rng(seed);
    const hours = pickHours(rng, blockCount, hourCount, perHour, hotCount);
    const s = await build(join(root, 'small'), size, baseBytes, hours, rng, true);
    const merged = s.unique * BLOCK;
    const aboveFirst = new Set(hours.slice(1).flat()).size; // clusters qemu moves: those of ov02..ovNN

    const ours: Timed[] = [];
    const peer: Shell[] = [];
    for (let r = 0; r < runs; r++) {
      peer.push(await timedCommit(s));
      if (r > 0) await removeOutput(ours[r - 1]!);
      ours.push(await timedCollapse(s));
    }
    const o = best(ours);
    const q = best(peer);
    // The output of the last run stays (same bytes as every run's): read-back timing and export check.
    const last = ours[ours.length - 1]!;
    const readBack = await timeReadBack(last.result.path);
    if (last.result.blocks !== s.unique) throw new Error(`collapse merged ${last.result.blocks} blocks, expected ${s.unique}`);
    const ratio = q.seconds / o.seconds;
    console.log(
      `collapse ${fmtBytes(size)}: ${hourCount} incrementals (${s.writes} block writes, ${s.unique} unique = ${fmtMiB(merged)} merged) -> ${last.result.name} ` +
        `in ${fmtS(o.seconds)} = ${mibps(merged, o.seconds)} (${spread(ours)}; in-process collapse(); ${detail(o, readBack)}); ` +
        `qemu-img commit -b ov01 ov${String(hourCount).padStart(2, '0')}: ${fmtS(q.seconds)} = ${mibps(merged, q.seconds)} (${spread(peer)}; CPU ${fmtS(q.cpu)}; ` +
        `it copies the ${aboveFirst} clusters of ov02..ov${String(hourCount).padStart(2, '0')}); ` +
        `ratio ours/qemu ${ratio.toFixed(2)} (target >= 1.0: ${pass(ratio >= 1)}; by CPU seconds ${(q.cpu / o.cpu).toFixed(2)}); load average ${loadavg()[0]!.toFixed(2)}`,
    );

    // The floor: SPEC §2 gives every image an .md5 sidecar, and a collapsed file counts as
    // corrupt without one, so the collapse is not done before the MD5 of all it wrote is
    // taken. MD5 runs on one thread by nature; no overlap brings a collapse below it.
    const md5Seconds = await timeMd5(last.result.path, last.result.md5);
    console.log(
      `collapse floor: MD5 of the ${fmtMiB(last.result.bytes)} output alone (its .md5 sidecar, SPEC §2; one thread) ${fmtS(md5Seconds)} = ${mibps(last.result.bytes, md5Seconds)}; ` +
        `qemu-img commit's whole run ${fmtS(q.seconds)}; the best ratio any collapse with the sidecar can reach here ${(q.seconds / md5Seconds).toFixed(2)}`,
    );

    // Correctness: the -cd (with the base) reads as the disk at the last hour; qemu's merged ov01 too.
    const out = join(s.dir, 'export.raw');
    const exp = await timeShell(`node ${shq(CLI)} export ${shq(last.result.path)} ${shq(out)} 2>/dev/null`);
    const [a, b, qc] = await Promise.all([
      timeShell(`sha256sum < ${shq(out)}`),
      timeShell(`sha256sum < ${shq(s.raw)}`),
      timeShell(`qemu-img compare -q -f qcow2 -F raw ${shq(s.qemu!.overlays[0]!)} ${shq(s.raw)} && echo same || echo differ`),
    ]);
    const ha = a.stdout.split(' ')[0]!.trim();
    const hb = b.stdout.split(' ')[0]!.trim();
    const ok = ha === hb && ha.length === 64;
    console.log(
      `collapse check: node bin/imagekeep.js export ${last.result.name} (${fmtS(exp.seconds)}) sha256 ${ha.slice(0, 16)}… ` +
        `${ok ? '==' : '!='} hour-${hourCount} disk sha256 ${hb.slice(0, 16)}…: ${ok ? 'correct' : 'WRONG'} ` +
        `(qemu's merged ov01 vs the disk: ${qc.stdout.trim()})`,
    );
    if (!ok) process.exitCode = 1;
    if (!keep) await rm(s.dir, { recursive: true, force: true });

    if (big) {
      const bigBlocks = big / BLOCK;
      // Same count of blocks per hour and the same hot-set size, positions over the whole big disk.
      const bigHours = pickHours(new Rng(seed + 1), bigBlocks, hourCount, perHour, hotCount);
      const g = await build(join(root, 'big'), big, baseBytes, bigHours, new Rng(seed), false);
      const gRuns: Timed[] = [];
      for (let r = 0; r < runs; r++) {
        if (r > 0) await removeOutput(gRuns[r - 1]!);
        gRuns.push(await timedCollapse(g));
      }
      const gb = best(gRuns);
      const gMerged = g.unique * BLOCK;
      const gLast = gRuns[gRuns.length - 1]!;
      const gReadBack = await timeReadBack(gLast.result.path);
      if (gLast.result.blocks !== g.unique) throw new Error(`collapse merged ${gLast.result.blocks} blocks, expected ${g.unique}`);
      const scale = gb.seconds / o.seconds;
      const perByte = (gb.seconds / gMerged) / (o.seconds / merged);
      console.log(
        `collapse ${fmtBytes(big)}: ${hourCount} incrementals (${g.writes} block writes, ${g.unique} unique = ${fmtMiB(gMerged)} merged) in ${fmtS(gb.seconds)} ` +
          `= ${mibps(gMerged, gb.seconds)} (${spread(gRuns)}; ${detail(gb, gReadBack)}); ${fmtBytes(size)}: ${fmtS(o.seconds)}; ` +
          `ratio ${fmtBytes(big)}/${fmtBytes(size)} time ${scale.toFixed(2)}, per merged byte ${perByte.toFixed(2)} (target 0.8..1.2: ${pass(scale >= 0.8 && scale <= 1.2)}; by CPU seconds ${(gb.cpu / o.cpu).toFixed(2)}); load average ${loadavg()[0]!.toFixed(2)}`,
      );
      if (!keep) await rm(g.dir, { recursive: true, force: true });
    }
  } finally {
    await cleanup();
    if (keep) console.log(`kept ${root}`);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
