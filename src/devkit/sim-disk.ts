/**
 * Simulated source disks for tests and the demo: a sparse raw image with a real partition
 * table and real filesystems (made by sfdisk, mke2fs, mkntfs, mkfs.fat), a seeded file set,
 * and operations that change it the way a user's disk changes between backups.
 *
 * A `SimDisk` holds no state that is not on the disk: the layout is read back from the
 * image (`sfdisk --json` + blkid), so `openDisk(path)` in another process sees the same
 * disk `makeDisk` made. Its only private state is a scratch directory (mount points, NTFS
 * sidecars) and a PRNG for rounds that pass no seed. Operations on one SimDisk run one at a
 * time; every mount is undone before an operation returns, also on error.
 */
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DevkitUsageError, run } from './exec.js';
import { unmountAll, type FuseMount } from './fuse-mount.js';
import { defaultVolumes, MiB, planTable, readLayout, type Layout, type Partition, type Scheme, type VolumeSpec } from './partition.js';
import { Prng } from './prng.js';
import { sha256File } from './region.js';
import { fillTree, hashTree, mutateTree, populate, removeFiles, type MutationOp, type MutationPlan, type TreeFile } from './tree.js';
import { DRIVERS, dropSidecars, openable, withVolume, type VolumeContext } from './volumes.js';

export interface ManifestEntry extends TreeFile {
  partition: number;
}

/** Every regular file of every volume, sorted by partition number then path. */
export interface Manifest {
  files: ManifestEntry[];
}

export interface MakeDiskOptions {
  /** Where to create the image; an existing file is replaced. */
  path: string;
  /** Bytes; a multiple of 1 MiB. */
  size: number;
  scheme?: Scheme;
  /** MBR only: volumes 1-2 are primaries, partition 3 is extended, volumes 3.. are logicals 5.. */
  logical?: boolean;
  /** Default: NTFS over half the disk and ext4 over the rest (see `defaultVolumes`). */
  volumes?: VolumeSpec[];
  /** Seeds the file set, the table and filesystem ids, and later seedless mutate rounds. */
  seed?: number;
  /** Files per volume. Default: one per 4 MiB of volume, between 20 and 300. */
  files?: number;
  /** Bytes of initial content per volume. Default: an eighth of the volume, at most 64 MiB. */
  bytes?: number;
  /** Parent of the scratch directory; default os.tmpdir(). */
  tmpDir?: string;
}

export interface MutateOptions {
  /** Seeds this round; default: the disk's own generator (so successive rounds differ). */
  seed?: number;
  /** Files to create (default 4). */
  create?: number;
  /** Files to rewrite a range of or append to (default 4). */
  modify?: number;
  /** Files to delete (default 2). */
  remove?: number;
  /** Bytes to write over the creates and modifies, roughly (default 2 MiB). */
  bytes?: number;
  /** Limit the round to these partition numbers; default every formatted volume. */
  partitions?: number[];
}

export interface MutationReport {
  ops: MutationOp[];
  /** Bytes written into files (not counting filesystem metadata). */
  bytes: number;
}

export interface FillReport {
  volumes: { partition: number; files: number; bytes: number }[];
}

export interface OpenDiskOptions {
  tmpDir?: string;
  /** Seeds seedless mutate rounds (default 1). */
  seed?: number;
}

export class SimDisk {
  readonly path: string;
  readonly layout: Layout;
  /** The files `makeDisk` wrote (undefined for a disk opened with `openDisk`). */
  readonly initialFiles: ManifestEntry[] | undefined;
  readonly #ctx: VolumeContext;
  readonly #rng: Prng;
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  /** The image's mtime/ctime/size after our last operation; see `#exclusive`. */
  #stamp: string | undefined;

  private constructor(path: string, layout: Layout, ctx: VolumeContext, rng: Prng, initialFiles: ManifestEntry[] | undefined, stamp: string) {
    this.#stamp = stamp;
    this.path = path;
    this.layout = layout;
    this.#ctx = ctx;
    this.#rng = rng;
    this.initialFiles = initialFiles;
  }

  /** @internal use `makeDisk` or `openDisk`. */
  static async create(opts: MakeDiskOptions): Promise<SimDisk> {
    const scheme = opts.scheme ?? 'gpt';
    const logical = opts.logical ?? false;
    const seed = opts.seed ?? 1;
    if (!Number.isSafeInteger(opts.size) || opts.size % MiB !== 0) throw new DevkitUsageError(`size must be a whole number of MiB, got ${opts.size}`);
    const volumes = opts.volumes ?? defaultVolumes(opts.size, logical);
    const rng = new Prng(seed);
    const plan = planTable(scheme, opts.size, volumes, logical, rng.fork());

    const fh = await open(opts.path, 'w');
    try {
      await fh.truncate(opts.size);
    } finally {
      await fh.close();
    }
    await run('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', '--wipe', 'never', opts.path], { input: plan.script });
    const table = await readLayout(opts.path, opts.size);
    if (table.partitions.length !== plan.volumes.length) {
      throw new Error(`sfdisk made ${table.partitions.length} partitions for ${plan.volumes.length} volumes: ${plan.script}`);
    }

    const ctx = await newContext(opts.path, opts.tmpDir);
    try {
      // One generator per volume, forked in partition order before any work starts, so the
      // volumes can be filled in parallel and still come out the same for a seed.
      const jobs = table.partitions.map((part, i) => ({ part, spec: plan.volumes[i] as VolumeSpec, rng: rng.fork() }));
      const created = await settleAll(
        jobs.map(async ({ part, spec, rng: vrng }): Promise<ManifestEntry[]> => {
          const driver = DRIVERS[spec.fs];
          if (spec.fs === 'none') return [];
          const staging = await mkdtemp(join(ctx.tmpDir, `p${part.number}-staging-`));
          try {
            const files = opts.files ?? Math.min(300, Math.max(20, Math.round(part.length / (4 * MiB))));
            const bytes = opts.bytes ?? Math.min(64 * MiB, Math.floor(part.length / 8));
            const written = await populate(staging, vrng.fork(), { files, bytes, maxFileSize: Math.min(4 * MiB, Math.max(1, Math.floor(bytes / 4))) });
            await driver.format(ctx, { ...part, fs: spec.fs }, { label: spec.label, staging, rng: vrng.fork() });
            return written.map((f) => ({ partition: part.number, ...f }));
          } finally {
            await rm(staging, { recursive: true, force: true });
          }
        }),
      );
      const layout = await readLayout(opts.path, opts.size);
      layout.partitions.forEach((p, i) => {
        const want = plan.volumes[i]?.fs;
        if (p.fs !== want) throw new Error(`partition ${p.number}: blkid finds ${p.fs} where ${want} was made`);
      });
      return new SimDisk(opts.path, layout, ctx, rng.fork(), created.flat(), await stampOf(opts.path));
    } catch (err) {
      await disposeContext(ctx).catch(() => undefined);
      throw err;
    }
  }

  /** @internal use `openDisk`. */
  static async open(path: string, opts: OpenDiskOptions = {}): Promise<SimDisk> {
    const fh = await open(path, 'r');
    let size: number;
    try {
      size = (await fh.stat()).size;
    } finally {
      await fh.close();
    }
    const layout = await readLayout(path, size);
    const ctx = await newContext(path, opts.tmpDir);
    return new SimDisk(path, layout, ctx, new Prng(opts.seed ?? 1), undefined, await stampOf(path));
  }

  /** The formatted volumes (partitions with a filesystem). */
  get volumes(): Partition[] {
    return this.layout.partitions.filter(openable);
  }

  partition(number: number): Partition {
    const part = this.layout.partitions.find((p) => p.number === number);
    if (!part) {
      throw new DevkitUsageError(`no partition ${number} on ${this.path}; it has ${this.layout.partitions.map((p) => p.number).join(', ')}`, { partition: number });
    }
    return part;
  }

  /** Random file changes on the volumes; they are in the disk image when this resolves. */
  mutate(opts: MutateOptions = {}): Promise<MutationReport> {
    return this.#exclusive(async () => {
      const rng = opts.seed === undefined ? this.#rng.fork() : new Prng(opts.seed);
      const targets = opts.partitions ? opts.partitions.map((n) => this.partition(n)) : this.volumes;
      for (const t of targets) if (!openable(t)) throw new DevkitUsageError(`partition ${t.number} has no filesystem to change`, { partition: t.number });
      if (targets.length === 0) return { ops: [], bytes: 0 };
      const create = opts.create ?? 4;
      const modify = opts.modify ?? 4;
      const remove = opts.remove ?? 2;
      const bytes = opts.bytes ?? 2 * MiB;
      const plans = new Map<number, MutationPlan>(targets.map((t) => [t.number, { create: 0, modify: 0, remove: 0, bytes: 0 }]));
      const deal = (count: number, key: 'create' | 'modify' | 'remove'): void => {
        for (let i = 0; i < count; i++) (plans.get(rng.pick(targets).number) as MutationPlan)[key]++;
      };
      deal(create, 'create');
      deal(modify, 'modify');
      deal(remove, 'remove');
      const writes = create + modify;
      for (const p of plans.values()) p.bytes = writes > 0 ? Math.round((bytes * (p.create + p.modify)) / writes) : 0;
      const jobs = targets.map((part) => ({ part, plan: plans.get(part.number) as MutationPlan, rng: rng.fork() }));
      const results = await settleAll(
        jobs
          .filter(({ plan }) => plan.create + plan.modify + plan.remove > 0)
          .map(({ part, plan, rng: vrng }) => withVolume(this.#ctx, part, 'rw', (vol) => mutateTree(vol.root, vrng, part.number, plan, () => vol.freeBytes()))),
      );
      const ops = results.flat();
      return { ops, bytes: ops.reduce((sum, op) => sum + op.bytes, 0) };
    });
  }

  /** Every file on every volume with its size and sha256, read through read-only mounts. */
  manifest(): Promise<Manifest> {
    return this.#exclusive(async () => {
      const perVolume = await settleAll(
        this.volumes.map(async (part) => {
          const files = await withVolume(this.#ctx, part, 'ro', (vol) => hashTree(vol.root));
          return files.map((f): ManifestEntry => ({ partition: part.number, ...f }));
        }),
      );
      return { files: perVolume.flat() };
    });
  }

  /**
   * Fills each volume with random-data files until (nearly) full, then deletes them in a
   * second mount, so the free space holds garbage while the file set is unchanged.
   */
  fillFreeSpaceThenDelete(opts: { seed?: number } = {}): Promise<FillReport> {
    return this.#exclusive(async () => {
      const rng = opts.seed === undefined ? this.#rng.fork() : new Prng(opts.seed);
      const jobs = this.volumes.map((part) => ({ part, rng: rng.fork() }));
      const volumes = await settleAll(
        jobs.map(async ({ part, rng: vrng }) => {
          const filled = await withVolume(this.#ctx, part, 'rw', (vol) => fillTree(vol.root, vrng, () => vol.freeBytes()));
          await withVolume(this.#ctx, part, 'rw', (vol) => removeFiles(vol.root, filled.paths));
          return { partition: part.number, files: filled.paths.length, bytes: filled.bytes };
        }),
      );
      return { volumes };
    });
  }

  /** sha256 (hex) of the whole image. */
  hash(): Promise<string> {
    return this.#exclusive(() => sha256File(this.path));
  }

  /** Clears the root inode of an ext4 volume, so `e2fsck -fn` reports errors (exit 4). */
  damageExtMetadata(partition: number): Promise<void> {
    return this.#exclusive(async () => {
      const part = this.partition(partition);
      if (part.fs !== 'ext4') throw new DevkitUsageError(`partition ${partition} holds ${part.fs}, not ext4`, { partition, fs: part.fs });
      // e2fsprogs opens "file?offset=N" as the filesystem starting N bytes into the file.
      await run('debugfs', ['-w', '-R', 'clri <2>', `${this.path}?offset=${part.offset}`]);
    });
  }

  /** Unmounts anything left and removes the scratch directory. The image itself stays. */
  async cleanup(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#queue.catch(() => undefined);
    await disposeContext(this.#ctx);
  }

  /**
   * Runs `fn` after every earlier operation. Around it, the image's mtime/ctime/size are
   * compared with what our last operation left: a difference means someone else wrote the
   * image, and the cached NTFS sidecars are dropped. (Timestamps tick every few ms; call
   * `forgetCaches()` after writing the image yourself if that could be quicker.)
   */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new DevkitUsageError(`${this.path}: SimDisk used after cleanup()`));
    const guarded = async (): Promise<T> => {
      if ((await stampOf(this.path)) !== this.#stamp) await dropSidecars(this.#ctx);
      try {
        return await fn();
      } finally {
        this.#stamp = await stampOf(this.path).catch(() => undefined);
      }
    };
    const next = this.#queue.then(guarded, guarded);
    this.#queue = next.catch(() => undefined);
    return next;
  }

  /** Drops cached copies of partitions (NTFS sidecars); for callers that wrote the image. */
  forgetCaches(): Promise<void> {
    return this.#exclusive(() => dropSidecars(this.#ctx));
  }
}

async function newContext(diskPath: string, parent: string | undefined): Promise<VolumeContext> {
  const tmp = await mkdtemp(join(parent ?? tmpdir(), 'imagekeep-devkit-'));
  return { diskPath, tmpDir: tmp, mounts: new Set<FuseMount>(), sidecars: new Map<number, string>() };
}

/**
 * Like Promise.all, but waits for every job before rejecting: the volume jobs run in
 * parallel, and an operation must not return (or clean up) while one is still mounted.
 */
async function settleAll<T>(jobs: Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

async function stampOf(path: string): Promise<string> {
  const s = await stat(path, { bigint: true });
  return `${s.mtimeNs}/${s.ctimeNs}/${s.size}/${s.ino}`;
}

async function disposeContext(ctx: VolumeContext): Promise<void> {
  try {
    await unmountAll(ctx.mounts);
  } finally {
    await rm(ctx.tmpDir, { recursive: true, force: true });
  }
}

/** Creates a sparse disk image with a partition table, filesystems and a seeded file set. */
export function makeDisk(opts: MakeDiskOptions): Promise<SimDisk> {
  return SimDisk.create(opts);
}

/** Opens an existing image (made by `makeDisk`, possibly in another process). */
export function openDisk(path: string, opts: OpenDiskOptions = {}): Promise<SimDisk> {
  return SimDisk.open(path, opts);
}

/** Files added, removed and changed (size or sha256) from manifest `a` to manifest `b`. */
export function diffManifests(a: Manifest, b: Manifest): { added: ManifestEntry[]; removed: ManifestEntry[]; changed: ManifestEntry[] } {
  const key = (e: ManifestEntry): string => `${e.partition}:${e.path}`;
  const before = new Map(a.files.map((e) => [key(e), e]));
  const after = new Map(b.files.map((e) => [key(e), e]));
  return {
    added: b.files.filter((e) => !before.has(key(e))),
    removed: a.files.filter((e) => !after.has(key(e))),
    changed: b.files.filter((e) => {
      const old = before.get(key(e));
      return old !== undefined && (old.sha256 !== e.sha256 || old.size !== e.size);
    }),
  };
}
