/**
 * `backup` (SPEC §5): a full or incremental image of a raw disk image or block device.
 * The source is read once, sequentially, in batches; workers classify each block (zero,
 * free in its filesystem, unchanged by digest, changed) and encode the changed ones; the
 * main thread writes records in order. Everything lands under a temporary name and is
 * renamed into place only when complete and fsynced, under the folder's lock.
 */
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { RefusedError, UsageError, WrongPasswordError } from '../formats/errors.js';
import type { DiskImage } from '../formats/disk-image.js';
import { formats } from '../formats/drivers.js';
import { findFreeRanges, freeBlockMask } from '../formats/fs/allocation.js';
import { PREV_DATA, PREV_ZERO, type BatchRequest, type BatchResult } from './image/block-batch.js';
import { createChainKey, type ChainKeys } from './image/crypto.js';
import { DIGEST_SIZE, blockCountOf, type Compression, type EncryptionInfo, type ImageHeader, type SourceKind } from './image/layout.js';
import { KeyRing } from './image/reader.js';
import { batchRunner } from './image/worker-pool.js';
import { ImageWriter } from './image/writer.js';
import { groupChains, listFolder, loadChain, type ChainFile } from './folder.js';
import { FolderLock } from './lock.js';
import { badLogPath, formatImageName, keyFilePath, validVolumeName } from './names.js';
import { dependencyPath, newestFile } from './path.js';
import { PointInTime } from './point.js';
import { readSidecar } from './sidecar.js';
import { writeKeyFile } from './keyfile.js';
import { readBadLog } from './badlog.js';
import { readChangedBlocks } from './changed-blocks.js';
import { mountsOf } from './in-use.js';

const execFileAsync = promisify(execFile);

export interface BackupOptions {
  /** Format of the source file (raw, vhd, vhdx, vmdk, qcow2); probed when absent. */
  sourceFormat?: string;
  volume?: string;
  full?: boolean;
  /** capture time of the point, ms since the epoch; default now */
  at?: number;
  forensic?: boolean;
  blockSize?: number;
  compression?: Compression;
  compressionLevel?: number;
  password?: Buffer | null;
  changedBlocksFile?: string;
  pre?: string;
  post?: string;
  /** encoding threads; 0 encodes on the calling thread; default one per core */
  workers?: number;
  onWarning?: (message: string) => void;
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

export interface BackupResult {
  image: string;
  path: string;
  kind: 'full' | 'incremental';
  volume: string;
  base: number;
  number: number;
  pointTime: string;
  sourceBytes: number;
  bytesRead: number;
  imageBytes: number;
  dataBlocks: number;
  zeroBlocks: number;
  freedBytes: number;
  md5: string;
  seconds: number;
}

const DEFAULT_BLOCK = 64 * 1024;
const BATCH_BYTES = 4 * 1024 * 1024;

export async function backup(sourcePath: string, folder: string, opts: BackupOptions = {}): Promise<BackupResult> {
  const started = Date.now();
  const warn = opts.onWarning ?? (() => {});
  const dir = resolve(folder);
  await mkdir(dir, { recursive: true });
  const source = await openSource(sourcePath, opts.sourceFormat);
  let ranPre = false;
  let lock: FolderLock | null = null;
  try {
    lock = await FolderLock.acquire(dir, `backup of ${sourcePath}`);
    const plan = await planBackup(dir, source, opts, warn);
    await warnIfMountedReadWrite(sourcePath, warn);
    if (opts.pre) {
      ranPre = true;
      await runHook('pre', opts.pre);
    }
    return await capture(dir, source, plan, opts, warn, started);
  } finally {
    try {
      if (ranPre && opts.post) await runHook('post', opts.post);
    } finally {
      await lock?.release();
      await source.close();
    }
  }
}

interface Plan {
  volume: string;
  base: number;
  number: number; // 0 for a full
  pointTime: number;
  blockSize: number;
  chainId: Buffer;
  parentPointId: Buffer;
  encryption: EncryptionInfo | null;
  keys: ChainKeys | null;
  newKeyFile: boolean;
  previous: PointInTime | null;
}

/** A block device, a raw file, or a virtual disk in any format we read (probed, or as named). */
async function openSource(path: string, format?: string): Promise<DiskImage> {
  const st = await stat(path).catch(() => null);
  if (!st) throw new UsageError(`source ${path} does not exist`);
  if (!st.isFile() && !st.isBlockDevice()) throw new UsageError(`source ${path} is not a disk image file or a block device`);
  return formats.openPath(path, format);
}

async function planBackup(dir: string, source: DiskImage, opts: BackupOptions, warn: (m: string) => void): Promise<Plan> {
  const { images } = await listFolder(dir);
  const volumes = [...new Set(images.map((i) => i.volume))];
  const volume = opts.volume ?? (volumes.length === 1 ? volumes[0]! : 'C_VOL');
  if (!validVolumeName(volume)) throw new UsageError(`volume name "${volume}" may hold only letters, digits, "_" and "." (up to 64)`);
  const mine = images.filter((i) => i.volume === volume);
  const newestBase = Math.max(0, ...mine.map((i) => i.base));
  const pointTime = opts.at ?? Date.now();
  const password = opts.password ?? null;

  let chain: ChainFile[] = [];
  if (newestBase > 0) {
    const loaded = await loadChain(groupChains(mine).get(`${volume}-b${String(newestBase).padStart(3, '0')}`) ?? []);
    if (loaded.unreadable.length > 0 && !opts.full) {
      const u = loaded.unreadable[0]!;
      throw new RefusedError('CHAIN_DAMAGED', `cannot extend the chain: ${u.error.message}; take a new full backup with --full`);
    }
    chain = loaded.files;
  }
  const newest = newestFile(chain);
  if (newest && pointTime <= newest.header.pointTime) {
    throw new UsageError(`--at ${new Date(pointTime).toISOString()} is not after the previous point ${newest.name} (${new Date(newest.header.pointTime).toISOString()}); points must move forward in time`);
  }

  if (opts.full || !newest) {
    const blockSize = opts.blockSize ?? DEFAULT_BLOCK;
    if (!Number.isInteger(Math.log2(blockSize)) || blockSize < 4096 || blockSize > 4 * 2 ** 20) {
      throw new UsageError(`--block-size ${blockSize} must be a power of two from 4096 to 4194304`);
    }
    const chainId = randomBytes(16);
    let encryption: EncryptionInfo | null = null;
    let keys: ChainKeys | null = null;
    if (password) ({ info: encryption, keys } = await createChainKey(password, chainId));
    return { volume, base: newestBase + 1, number: 0, pointTime, blockSize, chainId, parentPointId: Buffer.alloc(16), encryption, keys, newKeyFile: !!password, previous: null };
  }

  // Incremental: the chain must be sound along the path we extend.
  const path = dependencyPath(newest, chain);
  const bad = await readBadLog(badLogPath(dir, volume, newestBase));
  const badOnPath = path.filter((f) => bad.has(f.name));
  if (badOnPath.length > 0) {
    throw new RefusedError('BAD_ON_PATH', `cannot extend the chain: ${badOnPath.map((f) => f.name).join(', ')} failed verification (listed in ${volume}-b${String(newestBase).padStart(3, '0')}.bad.log); repair or replace it, or take a new full backup with --full`);
  }
  if (bad.size > 0) warn(`${[...bad.keys()].join(', ')} failed verification but is not on the path of the new point; continuing`);
  for (const f of path) {
    if ((await readSidecar(f.path, f.name)) === null) {
      throw new RefusedError('MISSING_MD5', `cannot extend the chain: ${f.name} has no .md5 sidecar and counts as corrupt; run "imagekeep verify --deep --repair ${f.path}" or take a new full backup with --full`);
    }
  }
  const h = newest.header;
  if (h.encryption && !password) throw new WrongPasswordError(`chain ${volume}-b${String(newestBase).padStart(3, '0')} is encrypted: give its password with --password-file FILE or IMAGEKEEP_PASSWORD_FILE`);
  if (!h.encryption && password) throw new UsageError(`chain ${volume}-b${String(newestBase).padStart(3, '0')} is not encrypted; a chain cannot change that: start a new encrypted chain with --full`);
  if (opts.blockSize && opts.blockSize !== h.blockSize) warn(`--block-size ${opts.blockSize} ignored: the chain uses ${h.blockSize}`);
  if (source.size !== h.virtualSize) {
    throw new RefusedError('SOURCE_SIZE_CHANGED', `the source is ${source.size} bytes but the chain's disk is ${h.virtualSize} bytes; a resized disk needs a new full backup (--full)`);
  }
  const keyring = new KeyRing(password);
  const previous = await PointInTime.open(path.map((f) => f.path), keyring);
  return {
    volume, base: newestBase, number: newest.last + 1, pointTime, blockSize: h.blockSize, chainId: h.chainId,
    parentPointId: h.endPointId, encryption: h.encryption, keys: previous.top.keys, newKeyFile: false, previous,
  };
}

async function capture(dir: string, source: DiskImage, plan: Plan, opts: BackupOptions, warn: (m: string) => void, started: number): Promise<BackupResult> {
  const { blockSize } = plan;
  const blockCount = blockCountOf(source.size, blockSize);
  let sourceKind: SourceKind = 'disk';
  let free: Uint8Array | null = null;
  if (!opts.forensic) {
    const report = await findFreeRanges(source);
    sourceKind = report.scheme === 'none' && report.volumes.some((v) => v.fs !== 'unknown') ? 'volume' : 'disk';
    for (const v of report.volumes) if (v.note) warn(`${v.partition ? `partition ${v.partition}` : 'volume'}: ${v.note}; its free space is stored as is`);
    free = freeBlockMask(report.free, source.size, blockSize);
  }
  const changed = opts.changedBlocksFile && plan.previous
    ? await readChangedBlocks(opts.changedBlocksFile, source.size, blockSize)
    : null;

  const compression = opts.compression ?? 'zstd';
  const header: ImageHeader = {
    version: 1, chainId: plan.chainId, volume: plan.volume, baseNumber: plan.base, first: plan.number, last: plan.number,
    levelBits: 0, parentPointId: plan.parentPointId, endPointId: randomBytes(16), pointTime: plan.pointTime, createdTime: Date.now(),
    sourceKind, forensic: !!opts.forensic, virtualSize: source.size, sectorSize: 512, blockSize, compression,
    compressionLevel: opts.compressionLevel ?? 1, encryption: plan.encryption,
  };
  const name = formatImageName({ volume: plan.volume, base: plan.base, last: plan.number, levelBits: 0 });
  const finalPath = join(dir, name);
  const writer = await ImageWriter.create(finalPath, header);
  const pool = batchRunner({ compression, level: header.compressionLevel, keys: plan.keys }, opts.workers);
  let bytesRead = 0;
  let freedBytes = 0;
  try {
    const batchBlocks = Math.max(1, Math.floor(BATCH_BYTES / blockSize));
    const spare: ArrayBuffer[] = [];
    const inflight: Promise<BatchResult>[] = [];
    const maxInflight = 6;
    let nextId = 0;
    const drainOne = async () => {
      const r = await inflight.shift()!;
      await writer.appendBatch(r.firstBlock, r);
      freedBytes += r.freedBytes;
      spare.push(r.data.buffer as ArrayBuffer);
    };
    for (const [start, count] of runs(blockCount, batchBlocks, changed)) {
      if (opts.signal?.aborted) throw opts.signal.reason ?? new Error('aborted');
      if (inflight.length >= maxInflight) await drainOne();
      const at = start * blockSize;
      const length = Math.min(count * blockSize, source.size - at);
      const ab = spare.pop() ?? new ArrayBuffer(batchBlocks * blockSize);
      const req: BatchRequest = {
        id: nextId++, data: new Uint8Array(ab, 0, length), firstBlock: start, blockSize,
        free: free ? free.slice(start, start + count) : null,
        prevKinds: null, prevDigests: null,
      };
      if (plan.previous) {
        req.prevKinds = new Uint8Array(count);
        req.prevDigests = new Uint8Array(count * DIGEST_SIZE);
        for (let i = 0; i < count; i++) {
          const loc = plan.previous.locate(start + i);
          if (loc) {
            req.prevKinds[i] = PREV_DATA;
            req.prevDigests.set(loc.image.digestAt(loc.pos), i * DIGEST_SIZE);
          } else req.prevKinds[i] = PREV_ZERO;
        }
      }
      // Reads overlap each other and the workers; results are still taken in order.
      const task = source.read(req.data, at).then(() => {
        bytesRead += length;
        opts.onProgress?.(at + length, source.size);
        return pool.run(req);
      });
      task.catch(() => {}); // observed by drainOne; avoid an unhandled rejection meanwhile
      inflight.push(task);
    }
    while (inflight.length > 0) await drainOne();
    if (plan.newKeyFile && plan.encryption) await writeKeyFile(keyFilePath(dir, plan.volume, plan.base), plan.chainId, plan.encryption);
    const mtime = new Date(plan.pointTime);
    const done = await writer.commit({ mtime });
    return {
      image: name, path: finalPath, kind: plan.number === 0 ? 'full' : 'incremental', volume: plan.volume, base: plan.base,
      number: plan.number, pointTime: mtime.toISOString(), sourceBytes: source.size, bytesRead, imageBytes: done.bytes,
      dataBlocks: done.dataBlocks, zeroBlocks: done.zeroBlocks, freedBytes, md5: done.md5, seconds: (Date.now() - started) / 1000,
    };
  } catch (e) {
    await writer.abort();
    throw e;
  } finally {
    await pool.close();
    await plan.previous?.close();
  }
}

/** Runs of consecutive blocks to read: every block, or only the changed ones. */
function* runs(blockCount: number, batchBlocks: number, changed: Uint8Array | null): Generator<[number, number]> {
  if (!changed) {
    for (let s = 0; s < blockCount; s += batchBlocks) yield [s, Math.min(batchBlocks, blockCount - s)];
    return;
  }
  let b = 0;
  while (b < blockCount) {
    if (!changed[b]) { b++; continue; }
    const s = b;
    while (b < blockCount && changed[b] && b - s < batchBlocks) b++;
    yield [s, b - s];
  }
}

async function runHook(which: string, command: string): Promise<void> {
  try {
    await execFileAsync('/bin/sh', ['-c', command], { maxBuffer: 16 * 2 ** 20 });
  } catch (e) {
    const err = e as { code?: number; stderr?: string };
    throw new RefusedError('HOOK_FAILED', `--${which} command failed (exit ${err.code ?? '?'}): ${(err.stderr ?? '').trim().split('\n')[0] ?? ''}`);
  }
}

/** A source block device (or a partition of it) mounted read-write changes under our feet. */
async function warnIfMountedReadWrite(sourcePath: string, warn: (m: string) => void): Promise<void> {
  if (!(await stat(sourcePath)).isBlockDevice()) return;
  for (const m of await mountsOf(sourcePath)) {
    if (m.options.includes('rw')) warn(`${m.what} is mounted read-write at ${m.where}: the image may be inconsistent; use --pre/--post to freeze it or back up a snapshot`);
  }
}
