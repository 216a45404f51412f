/**
 * `process` (SPEC §7): the daily processing of one folder, in this order and under the
 * folder's lock shared with backup: clean up what a killed run left (orphan .md5
 * sidecars; temporary files go when the lock is taken), verify new and due images, then
 * for each chain collapse and retain as the planner says. The plan is recomputed from
 * the folder as it is, so a run killed at any step is completed by the next one: every
 * collapse is written under a temporary name and verified before its rename, and a
 * removal deletes (or hard-links into Incrementals/, then unlinks) the image before its
 * sidecar, leaving at worst an orphan .md5 for the next run to clear.
 */
import { appendFile, link, mkdir, readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { RefusedError } from '../formats/errors.js';
import { collapse } from './collapse.js';
import { durableUnlink, syncDir } from './durable.js';
import { groupChains, listFolder, loadChain, type ChainFile } from './folder.js';
import { KeyRing } from './image/reader.js';
import { FolderLock } from './lock.js';
import { chainKey } from './names.js';
import { planNight, type Action } from './policy/plan.js';
import type { PolicySettings } from './policy/settings.js';
import { sidecarPathFor } from './sidecar.js';
import { verify, type VerifyReport } from './verify-folder.js';

export const MOVED_DIR = 'Incrementals';
export const LOG_FILE = 'imagekeep.log';

export interface ProcessOptions {
  now?: number;
  dryRun?: boolean;
  keyring?: KeyRing;
  onLog?: (line: string) => void;
}

export interface ProcessReport {
  folder: string;
  dryRun: boolean;
  verified: VerifyReport | null;
  actions: (Action & { chain: string; done: boolean; error?: string })[];
  cleaned: string[];
  ok: boolean;
}

export async function processFolder(folder: string, settings: PolicySettings, opts: ProcessOptions = {}): Promise<ProcessReport> {
  const dir = resolve(folder);
  const now = opts.now ?? Date.now();
  const log = opts.onLog ?? (() => {});
  const report: ProcessReport = { folder: dir, dryRun: !!opts.dryRun, verified: null, actions: [], cleaned: [], ok: true };
  const lock = opts.dryRun ? null : await FolderLock.acquire(dir, 'process');
  try {
    if (!opts.dryRun) report.cleaned = await removeOrphanSidecars(dir, log);
    if (!opts.dryRun) {
      report.verified = await verify(dir, { locked: true, keyring: opts.keyring, now, dueAfterDays: settings.verifyEveryDays });
      for (const c of report.verified.checked) if (!c.ok) log(`verify: ${c.name} FAILED: ${c.reason}`);
      if (!report.verified.ok) report.ok = false;
    }
    const { images } = await listFolder(dir);
    for (const [key, members] of [...groupChains(images)].sort(([a], [b]) => a.localeCompare(b))) {
      const { files } = await loadChain(members);
      const plan = planNight(files.map((f) => ({
        name: f.name, volume: f.volume, base: f.base, first: f.first, last: f.last, levelBits: f.levelBits, pointTime: f.header.pointTime,
      })), settings, now);
      for (const action of plan.actions) {
        const entry = { ...action, chain: key, done: false } as ProcessReport['actions'][number];
        report.actions.push(entry);
        if (opts.dryRun) {
          log(`would ${describe(action)}`);
          continue;
        }
        try {
          await execute(dir, action, files, settings, now, opts.keyring ?? new KeyRing(null), log);
          entry.done = true;
        } catch (e) {
          entry.error = (e as Error).message;
          report.ok = false;
          log(`${key}: ${describe(action)} failed: ${entry.error}; the rest of this chain's plan waits for the next run`);
          break;
        }
      }
    }
    return report;
  } finally {
    await lock?.release();
  }
}

function describe(a: Action): string {
  return a.kind === 'collapse' ? `collapse ${a.sources.join(' + ')} into ${a.name} (${a.reason})` : `remove ${a.name} (${a.reason})`;
}

async function execute(dir: string, action: Action, files: ChainFile[], settings: PolicySettings, now: number, keyring: KeyRing, log: (l: string) => void): Promise<void> {
  if (action.kind === 'collapse') {
    // Sources are read from the folder as it is now: earlier actions of the night made some.
    const current = (await loadChain((await listFolder(dir)).images.filter((i) => chainKey(i.volume, i.base) === chainKey(files[0]!.volume, files[0]!.base)))).files;
    const sources = action.sources.map((n) => {
      const f = current.find((c) => c.name === n);
      if (!f) throw new RefusedError('PLAN_STALE', `${n}, a source of ${action.name}, is not in the folder`);
      return f;
    });
    const r = await collapse(dir, sources, { first: action.first, last: action.last, levelBits: action.levelBits }, { keyring, now });
    await writeLog(dir, now, `collapsed ${r.sources.join(' + ')} into ${r.name} (${r.blocks} blocks, ${r.bytes} bytes, verified): ${action.reason}`, log);
    return;
  }
  await removeImage(dir, action.name, settings.removal);
  await writeLog(dir, now, `${settings.removal === 'move' ? `moved to ${MOVED_DIR}/` : 'removed'} ${action.name}: ${action.reason}`, log);
}

/** Image first, then its sidecar; with `move`, both are hard-linked into Incrementals/ before. */
async function removeImage(dir: string, name: string, mode: PolicySettings['removal']): Promise<void> {
  const image = join(dir, name);
  const sidecar = sidecarPathFor(image);
  if (mode === 'move') {
    const to = join(dir, MOVED_DIR);
    await mkdir(to, { recursive: true });
    for (const p of [sidecar, image]) {
      const target = join(to, p.slice(dir.length + 1));
      await link(p, target).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'EEXIST' && e.code !== 'ENOENT') throw e;
      });
    }
    await syncDir(to);
  }
  await durableUnlink(image);
  await durableUnlink(sidecar).catch(() => {});
  await syncDir(dir);
}

/** An .md5 without its image is what a killed removal or collapse leaves: garbage. */
async function removeOrphanSidecars(dir: string, log: (l: string) => void): Promise<string[]> {
  const names = new Set(await readdir(dir));
  const removed: string[] = [];
  for (const n of names) {
    if (!n.endsWith('.md5')) continue;
    const stem = n.slice(0, -4);
    if (names.has(`${stem}.spf`) || names.has(`${stem}.spi`)) continue;
    if (!/-b\d{3,}/.test(stem)) continue;
    await durableUnlink(join(dir, n));
    removed.push(n);
    log(`removed ${n}: its image is gone`);
  }
  return removed;
}

async function writeLog(dir: string, now: number, line: string, log: (l: string) => void): Promise<void> {
  log(line);
  await appendFile(join(dir, LOG_FILE), `${new Date(now).toISOString()} ${line}\n`);
}

