/**
 * A mutation fuzzer for the disk codecs' parsers. Each case takes a small valid disk (a
 * seed), mutates it (bit flips, bytes set to 0x00/0xFF, 32- and 64-bit fields set to huge or
 * small values, truncation), opens it through the driver and reads what it claims to hold.
 * A case passes when the driver either reads it or refuses it with one of our typed errors
 * (ImagekeepError). It fails on any other exception (a TypeError, a RangeError from a read
 * past the end), on a case that takes longer than `slowMs`, and on an allocation above
 * `maxAllocation` bytes (a size field believed without a bound): Buffer's allocators are
 * wrapped while the fuzzer runs.
 *
 * Mutations land on the seed's non-zero bytes, which in a small, nearly empty disk are its
 * metadata. The mutated file is a copy-on-write view of the seed, so a multi-MiB VHDX seed
 * costs nothing per case.
 */
import type { DiskImage, FileOpener, FormatDriver } from '../formats/disk-image.js';
import { ImagekeepError, UsageError } from '../formats/errors.js';
import type { RandomAccessFile } from '../formats/types.js';
import { Prng } from './prng.js';

export interface FuzzSeed {
  name: string;
  /** The disk's own file. */
  bytes: Buffer;
  /** Sibling files the disk names (a VMDK's -flat.vmdk), by name. */
  siblings?: Record<string, Buffer>;
}

export interface FuzzFailure {
  caseNumber: number;
  seed: string;
  mutation: string;
  error: string;
}

export interface FuzzReport {
  format: string;
  cases: number;
  opened: number;
  refused: number;
  failures: FuzzFailure[];
  slowestMs: number;
  seconds: number;
}

export interface FuzzOptions {
  cases: number;
  seed?: number;
  slowMs?: number;
  maxAllocation?: number;
  /** Most bytes read from one opened case. */
  maxReadBytes?: number;
  /** Stop collecting after this many failures. */
  maxFailures?: number;
}

class AllocationTooLarge extends Error {}

/** A copy-on-write view of a seed with patches and an optional truncation. */
class MutatedFile implements RandomAccessFile {
  readonly patches: { at: number; bytes: Buffer }[] = [];
  length: number;

  constructor(readonly path: string, private readonly base: Buffer) {
    this.length = base.length;
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(into: Uint8Array, at: number): Promise<void> {
    if (!Number.isSafeInteger(at) || at < 0 || at + into.length > this.length) {
      throw new RangeError(`read of ${into.length} bytes at ${at} passes the end of ${this.path} (${this.length} bytes)`);
    }
    const inBase = Math.max(0, Math.min(into.length, this.base.length - at));
    if (inBase > 0) into.set(this.base.subarray(at, at + inBase));
    if (inBase < into.length) into.fill(0, inBase);
    for (const p of this.patches) {
      const from = Math.max(at, p.at);
      const to = Math.min(at + into.length, p.at + p.bytes.length);
      if (from < to) into.set(p.bytes.subarray(from - p.at, to - p.at), from - at);
    }
  }

  async write(): Promise<void> {
    throw new Error(`the fuzzer's files are read-only`);
  }

  async truncate(): Promise<void> {
    throw new Error(`the fuzzer's files are read-only`);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}
}

/** Offsets of the non-zero bytes of a buffer (at most `limit`, spread evenly). */
function interestingOffsets(bytes: Buffer, limit = 1 << 16): number[] {
  const all: number[] = [];
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) all.push(i);
  if (all.length <= limit) return all;
  const step = all.length / limit;
  return Array.from({ length: limit }, (_, k) => all[Math.floor(k * step)]!);
}

const HUGE_VALUES = [0xffffffff, 0x7fffffff, 0x80000000, 0x10000000, 0, 1, 0xfffffffe, 512, 4096];

function mutate(file: MutatedFile, seed: Buffer, offsets: number[], rng: Prng): string {
  const done: string[] = [];
  const n = rng.int(1, 4);
  for (let k = 0; k < n; k++) {
    const at = offsets.length > 0 && rng.chance(0.9) ? offsets[rng.int(0, offsets.length)]! : rng.int(0, Math.max(1, seed.length));
    const kind = rng.int(0, 6);
    if (kind === 0) {
      const bit = rng.int(0, 8);
      file.patches.push({ at, bytes: Buffer.from([(seed[at] ?? 0) ^ (1 << bit)]) });
      done.push(`flip bit ${bit} at ${at}`);
    } else if (kind === 1) {
      const v = rng.chance(0.5) ? 0xff : 0;
      file.patches.push({ at, bytes: Buffer.from([v]) });
      done.push(`byte ${v} at ${at}`);
    } else if (kind === 2 || kind === 3) {
      // A 32-bit field, aligned, either byte order, set to a boundary value.
      const aligned = at - (at % 4);
      const v = HUGE_VALUES[rng.int(0, HUGE_VALUES.length)]!;
      const b = Buffer.alloc(4);
      if (kind === 2) b.writeUInt32BE(v >>> 0); else b.writeUInt32LE(v >>> 0);
      file.patches.push({ at: aligned, bytes: b });
      done.push(`u32${kind === 2 ? 'be' : 'le'} ${v} at ${aligned}`);
    } else if (kind === 4) {
      const aligned = at - (at % 8);
      const b = Buffer.alloc(8, rng.chance(0.5) ? 0xff : 0);
      if (rng.chance(0.5)) b[rng.int(0, 8)] = rng.int(1, 256);
      file.patches.push({ at: aligned, bytes: b });
      done.push(`u64 ${b.toString('hex')} at ${aligned}`);
    } else {
      file.length = Math.min(file.length, rng.chance(0.5) ? at : rng.int(0, Math.max(1, seed.length)));
      done.push(`truncate to ${file.length}`);
    }
  }
  return done.join(', ');
}

async function readWhatItHolds(disk: DiskImage, rng: Prng, maxRead: number): Promise<void> {
  const buf = Buffer.allocUnsafe(64 * 1024);
  let budget = maxRead;
  for (const r of await disk.allocated()) {
    for (let at = r.offset; at < r.offset + r.length && budget > 0; at += buf.length) {
      const n = Math.min(buf.length, r.offset + r.length - at, disk.size - at);
      if (n <= 0) break;
      await disk.read(buf.subarray(0, n), at);
      budget -= n;
    }
    if (budget <= 0) break;
  }
  for (let i = 0; i < 8 && disk.size >= 512; i++) {
    const at = rng.int(0, Math.floor(disk.size / 512)) * 512;
    await disk.read(buf.subarray(0, Math.min(4096, disk.size - at)), at);
  }
}

type Allocator = (size: number, ...rest: never[]) => Buffer;

/** Replaces Buffer's allocators with ones that refuse sizes above `max`; returns the undo. */
function guardAllocations(max: number): () => void {
  const names = ['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const;
  const saved = names.map((n) => Buffer[n] as Allocator);
  names.forEach((n, i) => {
    const original = saved[i]!;
    const guarded = (size: number, ...rest: never[]) => {
      if (size > max) throw new AllocationTooLarge(`Buffer.${n}(${size}) exceeds the fuzzer's bound of ${max} bytes`);
      return original.call(Buffer, size, ...rest);
    };
    (Buffer as unknown as Record<string, Allocator>)[n] = guarded;
  });
  return () => names.forEach((n, i) => ((Buffer as unknown as Record<string, Allocator>)[n] = saved[i]!));
}

export async function fuzzDriver(driver: FormatDriver, seeds: FuzzSeed[], opts: FuzzOptions): Promise<FuzzReport> {
  const rng = new Prng(opts.seed ?? 1);
  const slowMs = opts.slowMs ?? 2000;
  const maxFailures = opts.maxFailures ?? 20;
  const offsets = seeds.map((s) => interestingOffsets(s.bytes));
  const report: FuzzReport = { format: driver.format, cases: 0, opened: 0, refused: 0, failures: [], slowestMs: 0, seconds: 0 };
  const started = Date.now();
  const unguard = guardAllocations(opts.maxAllocation ?? 256 * 1024 * 1024);
  try {
    for (let c = 0; c < opts.cases && report.failures.length < maxFailures; c++) {
      const si = rng.int(0, seeds.length);
      const seed = seeds[si]!;
      const file = new MutatedFile(seed.name, seed.bytes);
      const mutation = mutate(file, seed.bytes, offsets[si]!, rng);
      const opener: FileOpener = async (name) => {
        const sib = seed.siblings?.[name];
        if (!sib) throw new UsageError(`${name} is not among the fuzz seed's files`);
        return new MutatedFile(name, sib);
      };
      const t0 = performance.now();
      let disk: DiskImage | null = null;
      try {
        disk = await driver.open(file, opener);
        await readWhatItHolds(disk, rng, opts.maxReadBytes ?? 8 * 1024 * 1024);
        report.opened++;
      } catch (e) {
        if (e instanceof ImagekeepError) report.refused++;
        else {
          const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
          report.failures.push({ caseNumber: c, seed: seed.name, mutation, error: what });
        }
      } finally {
        await disk?.close().catch(() => {});
      }
      const ms = performance.now() - t0;
      report.slowestMs = Math.max(report.slowestMs, ms);
      if (ms > slowMs) report.failures.push({ caseNumber: c, seed: seed.name, mutation, error: `took ${ms.toFixed(0)} ms` });
      report.cases++;
    }
  } finally {
    unguard();
  }
  report.seconds = (Date.now() - started) / 1000;
  return report;
}
