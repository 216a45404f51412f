/**
 * The state file beside a standby disk (`<disk>.headstart.json` on the host): which point of
 * which chain the disk holds. It is the only record of progress, so it is written (whole,
 * through a temporary name) at exactly these moments:
 *
 *   - before a seed starts and after each seed checkpoint (everything before `nextBlock`
 *     written and flushed), so a killed seed resumes where it stopped;
 *   - when the seed is complete and flushed, before its files are renamed into place;
 *   - before an apply writes anything (`applying`), so no one starts the VM from a disk
 *     that is mid-apply;
 *   - after an apply is written, flushed and read back (`applied` moves on).
 *
 * `applied` therefore never names a point that was not fully written.
 */
import { posix } from 'node:path';
import { z } from 'zod';
import { CorruptImageError } from '../formats/errors.js';
import type { Host } from './host.js';

const pointSchema = z.object({
  /** Point number in its chain (0 = the base). */
  point: z.number().int().min(0),
  /** End point id of the point, hex: names this exact history, not just a number. */
  pointId: z.string().regex(/^[0-9a-f]{32}$/),
  /** Capture time, ms since the epoch. */
  time: z.number(),
});

const stateSchema = z.object({
  version: z.literal(1),
  disk: z.string(),
  format: z.string(),
  subformat: z.string(),
  chainId: z.string().regex(/^[0-9a-f]{32}$/),
  volume: z.string(),
  base: z.number().int().min(0),
  /** The point the disk holds completely; null while the first seed runs. */
  applied: pointSchema.nullable(),
  /** Set while an apply writes: the disk is a mix of `applied` and this point. */
  applying: pointSchema.nullable(),
  /** A seed in progress into files under temporary names. */
  seeding: z.object({
    chainId: z.string().regex(/^[0-9a-f]{32}$/),
    volume: z.string(),
    base: z.number().int().min(0),
    basePoint: pointSchema,
    /** Blocks before this one are written and flushed. */
    nextBlock: z.number().int().min(0),
    /** The files the format made, by final name, the disk's own first (a VMDK descriptor, then its extent). */
    files: z.array(z.string()),
    /** Every block is written and flushed; only the renames into place remain. */
    complete: z.boolean(),
  }).nullable(),
  /** The VM was started on this disk: the job never writes it again. */
  failedOver: z.object({ at: z.number() }).nullable(),
  updatedAt: z.number(),
}).strict();

export type StandbyPoint = z.infer<typeof pointSchema>;
export type StandbyState = z.infer<typeof stateSchema>;
export type SeedProgress = NonNullable<StandbyState['seeding']>;

export function statePath(dir: string, disk: string): string {
  return posix.join(dir, `${disk}.headstart.json`);
}

/** The temporary name a seed writes a file under until it is complete. */
export function seedingName(name: string): string {
  return `.seeding-${name}`;
}

export async function loadStandbyState(host: Host, dir: string, disk: string): Promise<StandbyState | null> {
  const path = statePath(dir, disk);
  const bytes = await host.readFile(path);
  if (!bytes) return null;
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new CorruptImageError(`${host.label}:${path} is not JSON; it was edited or damaged. Remove it and the disk to seed afresh`);
  }
  const r = stateSchema.safeParse(doc);
  if (!r.success) {
    throw new CorruptImageError(`${host.label}:${path} is not a HeadStart state file (${r.error.issues[0]!.path.join('.')}: ${r.error.issues[0]!.message}); remove it and the disk to seed afresh`);
  }
  return r.data;
}

export async function saveStandbyState(host: Host, dir: string, state: StandbyState): Promise<void> {
  const doc: StandbyState = { ...state, updatedAt: Date.now() };
  await host.writeFileAtomic(statePath(dir, state.disk), JSON.stringify(doc, null, 1) + '\n');
}
