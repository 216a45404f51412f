/**
 * One pass of a HeadStart job: bring the standby disk to the newest point its lag allows.
 *
 *   no disk yet, or the folder started a new chain  ->  seed from the base (into files under
 *       temporary names, resumable at checkpoints, renamed over the old disk when complete)
 *   disk holds point A, the policy allows T > A     ->  apply: write the union of the blocks
 *       changed in (A, T], each once at its content at T, flush, read back, then record T
 *   nothing newer allowed                           ->  nothing is written at all
 *
 * The state file (standby-state.ts) is the record; every step is ordered so that a process
 * killed anywhere resumes correctly on the next pass.
 */
import { posix } from 'node:path';
import type { DiskImage, DiskWriter, FileOpener, FormatDriver } from '../formats/disk-image.js';
import { RefusedError, UsageError } from '../formats/errors.js';
import type { FormatRegistry } from '../formats/registry.js';
import type { RandomAccessFile } from '../formats/types.js';
import type { KeyRing } from '../chain/image/reader.js';
import { PointInTime } from '../chain/point.js';
import { bestEndingAt } from '../chain/path.js';
import type { Host } from './host.js';
import { parseLag, type Job, type Lag } from './job.js';
import { basePoint, chooseTarget, currentChain, type SourceChain, type SourcePoint } from './source-points.js';
import { loadStandbyState, saveStandbyState, seedingName, type SeedProgress, type StandbyPoint, type StandbyState } from './standby-state.js';
import { ThrottledFile } from './throttle.js';
import { changedSince, copyBlocks, readBack, type CopyStats, type ReadBackStats } from './transfer.js';

/** A seed flushes and records its progress every this many bytes written. */
export const DEFAULT_CHECKPOINT_BYTES = 256 * 1024 * 1024;

export interface StandbyContext {
  job: Job;
  host: Host;
  /** The target folder on the host. */
  dir: string;
  registry: FormatRegistry;
  keyring: KeyRing;
  /** ms since the epoch; the lag policy counts back from it. */
  now?: number;
  /** Overrides the job's lag (failover brings the disk to the newest point). */
  lag?: Lag;
  checkpointBytes?: number;
  /** Decode blocks on this thread (in-process tests: worker threads there compile TypeScript). */
  inlineDecode?: boolean;
  signal?: AbortSignal;
  /** One line per step, for people. */
  log?: (line: string) => void;
  /** Bytes written so far out of the bytes this step will write. */
  onProgress?: (what: string, done: number, total: number) => void;
}

export interface StepReport {
  kind: 'seed' | 'apply';
  from: StandbyPoint | null;
  to: StandbyPoint;
  written: CopyStats;
  readBack: ReadBackStats | null;
  seconds: number;
}

export interface RunReport {
  /** What the disk holds after the pass. */
  applied: StandbyPoint | null;
  steps: StepReport[];
  /** True when the pass found nothing to do and wrote nothing. */
  upToDate: boolean;
}

export class FailedOverError extends RefusedError {
  constructor(message: string) {
    super('FAILED_OVER', message);
  }
}

export function diskPath(ctx: StandbyContext): string {
  return posix.join(ctx.dir, ctx.job.disk);
}

/** Refuses a disk the VM has run on. */
export function assertWritable(state: StandbyState | null, ctx: StandbyContext): void {
  if (state?.failedOver) {
    throw new FailedOverError(`${ctx.host.label}:${diskPath(ctx)} was failed over on ${new Date(state.failedOver.at).toISOString()}: the VM runs on it, so this job never writes it again; to build a new standby, give the job a new disk name`);
  }
}

/** One pass: seed or re-seed when needed, then apply up to the newest allowed point. */
export async function runPass(ctx: StandbyContext): Promise<RunReport> {
  const { job, host } = ctx;
  await host.mkdirp(ctx.dir);
  let state = await loadStandbyState(host, ctx.dir, job.disk);
  assertWritable(state, ctx);
  const chain = await currentChain(job.source, job.volume);
  const steps: StepReport[] = [];

  const sameHistory = state?.applied && state.chainId === chain.chainId && appliedStillOnChain(state.applied, chain);
  if (!state || !sameHistory || state.seeding) {
    if (state?.applied && !sameHistory && !state.seeding) {
      ctx.log?.(`the disk holds ${state.volume} chain ${state.base} point ${state.applied.point}; the folder's current chain is ${chain.base}: seeding it into a new file that replaces the disk when complete`);
    }
    const seeded = await seed(ctx, chain, state);
    state = seeded.state;
    if (seeded.step) steps.push(seeded.step);
  }

  const applied = state.applied!;
  const lag = ctx.lag ?? parseLag(job.lag);
  const now = ctx.now ?? Date.now();
  let target = await chooseTarget(job.source, chain, lag, now, applied.point);
  const cut = state.applying;
  if (cut && (!target || target.point < cut.point)) {
    // An apply to `cut` was cut short: the disk may hold any block changed up to it at its
    // content there, so only a point at or after it can be reached by writing changed blocks.
    // Finish it even if the policy would now wait.
    target = await chooseTarget(job.source, chain, { kind: 'newest' }, now, cut.point - 1);
    if (!target) {
      throw new RefusedError('MID_APPLY', `${host.label}:${diskPath(ctx)} was cut short while moving to point ${cut.point}, and no sound point at or after it is left in ${job.source}; ` +
        'remove the disk and its state file to seed it afresh');
    }
  }
  if (!target) return { applied, steps, upToDate: steps.length === 0 };
  steps.push(await apply(ctx, state, applied, target));
  return { applied: { point: target.point, pointId: target.pointId, time: target.time }, steps, upToDate: false };
}

/** Does the chain still hold the history the disk was written from (same point id where a file ends there)? */
function appliedStillOnChain(applied: StandbyPoint, chain: SourceChain): boolean {
  const file = bestEndingAt(chain.files, applied.point);
  if (file) return file.header.endPointId.toString('hex') === applied.pointId;
  // The point was folded into a longer consolidated file: its number is still on the chain.
  return chain.files.some((f) => f.first <= applied.point && applied.point <= f.last);
}

function stripPath(p: SourcePoint): StandbyPoint {
  return { point: p.point, pointId: p.pointId, time: p.time };
}

/** Opens a disk file for writing with the job's bandwidth limit. */
async function openForWrite(ctx: StandbyContext, path: string, mode: 'r+' | 'w'): Promise<RandomAccessFile> {
  const file = await ctx.host.open(path, mode);
  return ctx.job.bandwidthMBps ? new ThrottledFile(file, ctx.job.bandwidthMBps * 1e6) : file;
}

function driverOf(ctx: StandbyContext): FormatDriver {
  const driver = ctx.registry.get(ctx.job.format);
  if (!driver.create || !driver.openWritable) throw new UsageError(`imagekeep cannot keep a ${ctx.job.format} disk growing in place`);
  return driver;
}

async function seed(ctx: StandbyContext, chain: SourceChain, old: StandbyState | null): Promise<{ state: StandbyState; step: StepReport | null }> {
  const { job, host, dir } = ctx;
  const driver = driverOf(ctx);
  const base = basePoint(chain);
  const started = Date.now();
  let progress: SeedProgress | null = old?.seeding && old.seeding.chainId === chain.chainId ? old.seeding : null;
  // Until the seed commits, the state keeps describing the old disk, which stays usable.
  const keep: StandbyState = old?.applied ? old : {
    version: 1, disk: job.disk, format: job.format, subformat: job.subformat ?? '', chainId: chain.chainId, volume: chain.volume, base: chain.base,
    applied: null, applying: null, seeding: null, failedOver: null, updatedAt: 0,
  };
  const save = async (p: SeedProgress): Promise<void> => {
    progress = p;
    await saveStandbyState(host, dir, { ...keep, seeding: p });
  };

  // Files are written under temporary names; the format names them by their final names.
  const opened: string[] = [];
  const seedOpener: FileOpener = async (name, mode) => {
    if (!opened.includes(name)) opened.push(name);
    const path = posix.join(dir, seedingName(name));
    return mode === 'r' ? host.open(path, 'r') : openForWrite(ctx, path, mode === 'wx' ? 'w' : mode);
  };

  let written: CopyStats = { blocks: 0, bytes: 0 };
  let checked: ReadBackStats | null = null;
  if (!progress?.complete) {
    const point = await PointInTime.open(base.path.map((f) => f.path), ctx.keyring);
    let writer: DiskWriter | null = null;
    try {
      let p0: SeedProgress;
      if (!progress || progress.nextBlock === 0) {
        // A file left by a seed killed before its first record is simply written over.
        ctx.log?.(`seeding ${host.label}:${posix.join(dir, job.disk)} from ${base.path[0]!.name}`);
        writer = await driver.create!(await seedOpener(job.disk, 'w'), seedOpener, {
          size: point.size, finalName: job.disk, subformat: job.subformat, time: Math.floor(base.time / 1000),
        });
        p0 = { chainId: chain.chainId, volume: chain.volume, base: chain.base, basePoint: stripPath(base), nextBlock: 0, files: [...opened], complete: false };
        await save(p0);
      } else {
        p0 = progress;
        ctx.log?.(`resuming the seed of ${host.label}:${posix.join(dir, job.disk)} at block ${p0.nextBlock} of ${point.blockCount}`);
        opened.push(...p0.files.filter((f) => !opened.includes(f)));
        writer = await driver.openWritable!(await seedOpener(job.disk, 'r+'), seedOpener);
      }
      const stored = (b: number): boolean => point.locate(b) !== null;
      const w = writer;
      written = await copyBlocks(point, w, stored, {
        from: p0.nextBlock,
        skipZeroBlocks: true,
        inlineDecode: ctx.inlineDecode,
        signal: ctx.signal,
        onProgress: (bytes) => ctx.onProgress?.('seed', bytes, point.size),
        checkpoint: { bytes: ctx.checkpointBytes ?? DEFAULT_CHECKPOINT_BYTES, save: (nextBlock) => save({ ...progress!, nextBlock }) },
      });
      writer = null;
      await w.close();
      checked = await withDisk(ctx, driver, posix.join(dir, seedingName(job.disk)), seedOpener, (disk) => readBack(point, disk, stored, job.disk));
    } catch (e) {
      await writer?.abort().catch(() => {});
      throw e;
    } finally {
      await point.close();
    }
    await save({ ...progress!, complete: true });
  }

  // Extents first, the disk's own file (which names them) last.
  const files = progress!.files.length > 0 ? progress!.files : [job.disk];
  for (const name of [...files.slice(1), files[0]!]) {
    const tmp = posix.join(dir, seedingName(name));
    if (await host.stat(tmp)) await host.rename(tmp, posix.join(dir, name));
  }
  const state: StandbyState = {
    version: 1, disk: job.disk, format: job.format, subformat: job.subformat ?? '', chainId: chain.chainId, volume: chain.volume, base: chain.base,
    applied: stripPath(base), applying: null, seeding: null, failedOver: null, updatedAt: 0,
  };
  await saveStandbyState(host, dir, state);
  ctx.log?.(`seeded: the disk holds ${chain.volume} chain ${chain.base} base (point 0)`);
  const step: StepReport = { kind: 'seed', from: null, to: stripPath(base), written, readBack: checked, seconds: (Date.now() - started) / 1000 };
  return { state, step };
}

async function apply(ctx: StandbyContext, state: StandbyState, from: StandbyPoint, target: SourcePoint): Promise<StepReport> {
  const { job, host, dir } = ctx;
  const driver = driverOf(ctx);
  const started = Date.now();
  const path = posix.join(dir, job.disk);
  const point = await PointInTime.open(target.path.map((f) => f.path), ctx.keyring);
  try {
    const changed = changedSince(point, from.point);
    const isChanged = (b: number): boolean => changed[b] === 1;
    await saveStandbyState(host, dir, { ...state, applying: stripPath(target) });
    ctx.log?.(`applying points ${from.point + 1}..${target.point} to ${host.label}:${path}`);
    let writer: DiskWriter | null = await driver.openWritable!(await openForWrite(ctx, path, 'r+'), host.opener(dir));
    let written: CopyStats;
    try {
      let total = 0;
      for (let b = 0; b < point.blockCount; b++) if (changed[b]) total += point.blockSize;
      written = await copyBlocks(point, writer, isChanged, {
        skipZeroBlocks: false, inlineDecode: ctx.inlineDecode, signal: ctx.signal, onProgress: (bytes) => ctx.onProgress?.('apply', bytes, total),
      });
      const w = writer;
      writer = null;
      await w.close();
    } catch (e) {
      await writer?.abort().catch(() => {});
      throw e;
    }
    const checked = await withDisk(ctx, driver, path, host.opener(dir), (disk) => readBack(point, disk, isChanged, job.disk));
    await saveStandbyState(host, dir, { ...state, applied: stripPath(target), applying: null });
    ctx.log?.(`applied: the disk holds point ${target.point} (${new Date(target.time).toISOString()})`);
    return { kind: 'apply', from, to: stripPath(target), written, readBack: checked, seconds: (Date.now() - started) / 1000 };
  } finally {
    await point.close();
  }
}

/** Opens the disk afresh through its format's reader for `use`, then closes it. */
async function withDisk<T>(ctx: StandbyContext, driver: FormatDriver, path: string, opener: FileOpener, use: (disk: DiskImage) => Promise<T>): Promise<T> {
  const disk = await driver.open(await ctx.host.open(path, 'r'), opener);
  try {
    return await use(disk);
  } finally {
    await disk.close();
  }
}

/** The state, refusing a disk that is mid-apply or mid-seed (a VM must not start from it). */
export async function settledState(ctx: StandbyContext): Promise<StandbyState> {
  const state = await loadStandbyState(ctx.host, ctx.dir, ctx.job.disk);
  if (!state?.applied) throw new RefusedError('NOT_SEEDED', `${ctx.host.label}:${diskPath(ctx)} has not been seeded yet; run imagekeep headstart run first`);
  if (state.applying || state.seeding?.complete) {
    throw new RefusedError('MID_APPLY', `${ctx.host.label}:${diskPath(ctx)} is mid-apply (a run was cut short); run imagekeep headstart run to finish it first`);
  }
  return state;
}

export { loadStandbyState };
