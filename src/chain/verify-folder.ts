/**
 * Verifying the images of a folder (or one image's dependency path): quick or deep checks,
 * the state store updated, `<volume>-<base>.bad.log` rewritten to list exactly the files
 * that are known bad (removed when none is), and with --repair a missing .md5 re-created
 * for an image whose every block checks out.
 */
import { stat, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { writeFileAtomic } from './durable.js';
import { groupChains, listFolder } from './folder.js';
import { badLogPath, parseImageName } from './names.js';
import { readBadLog, formatBadLog } from './badlog.js';
import { resolvePath } from './open.js';
import { md5SidecarText, sidecarPathFor } from './sidecar.js';
import { currentState, loadState, saveState, type FolderState } from './state.js';
import { deepVerify, md5OfFile, quickVerify, type FileCheck } from './verify.js';
import { KeyRing } from './image/reader.js';
import { FolderLock } from './lock.js';

export interface VerifyOptions {
  deep?: boolean;
  repair?: boolean;
  keyring?: KeyRing;
  now?: number;
  /** only files not verified within this many days (the nightly schedule); default: all */
  dueAfterDays?: number;
  /** skip taking the folder lock (the caller holds it) */
  locked?: boolean;
  onFile?: (check: FileCheck & { repaired?: boolean }) => void;
}

export interface VerifyReport {
  folder: string;
  checked: (FileCheck & { repaired?: boolean; mode: 'quick' | 'deep' })[];
  skipped: string[];
  ok: boolean;
}

/** A folder: all its images. An image: the files of its dependency path. */
export async function verify(target: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const abs = resolve(target);
  const isImage = (await stat(abs)).isFile();
  const dir = isImage ? dirname(abs) : abs;
  const lock = opts.locked ? null : await FolderLock.acquire(dir, 'verify');
  try {
    let names: string[];
    if (isImage) names = (await resolvePath(abs)).path.map((f) => f.name);
    else names = (await listFolder(dir)).images.map((i) => i.name);
    const state = await loadState(dir);
    const report = await verifyNames(dir, names, state, opts);
    await saveState(dir, state);
    await updateBadLogs(dir, report);
    return report;
  } finally {
    await lock?.release();
  }
}

async function verifyNames(dir: string, names: string[], state: FolderState, opts: VerifyOptions): Promise<VerifyReport> {
  const now = opts.now ?? Date.now();
  const keyring = opts.keyring ?? new KeyRing(null);
  const mode = opts.deep ? 'deep' : 'quick';
  const report: VerifyReport = { folder: dir, checked: [], skipped: [], ok: true };
  for (const name of names) {
    const path = `${dir}/${name}`;
    const st = await stat(path);
    const prior = currentState(state, name, st.size, st.mtimeMs);
    const last = prior?.[mode] ?? (mode === 'quick' ? prior?.deep : undefined);
    if (opts.dueAfterDays !== undefined && last?.ok && now - last.at < opts.dueAfterDays * 86_400_000) {
      report.skipped.push(name);
      continue;
    }
    let check: FileCheck & { repaired?: boolean } = opts.deep ? await deepVerify(path, keyring) : await quickVerify(path);
    // Deep verify already checked every block; only the sidecar is then missing.
    if (!check.ok && check.sidecar === 'missing' && check.blocksOk && opts.repair) {
      const md5 = await md5OfFile(path);
      await writeFileAtomic(sidecarPathFor(path), Buffer.from(md5SidecarText(md5, name)), new Date(now));
      check = { name, ok: true, md5, sidecar: 'present', repaired: true };
    }
    const fileState = prior ?? { size: st.size, mtimeMs: st.mtimeMs };
    fileState[mode] = { at: now, ok: check.ok, ...(check.reason ? { reason: check.reason } : {}) };
    state.files[name] = fileState;
    report.checked.push({ ...check, mode });
    if (!check.ok) report.ok = false;
    opts.onFile?.(check);
  }
  // Forget files that no longer exist.
  const present = new Set((await listFolder(dir)).images.map((i) => i.name));
  for (const name of Object.keys(state.files)) if (!present.has(name)) delete state.files[name];
  return report;
}

/** Rewrites each touched chain's .bad.log: known-bad files stay listed until they verify good. */
export async function updateBadLogs(dir: string, report: VerifyReport): Promise<void> {
  const { images } = await listFolder(dir);
  const existing = new Set(images.map((i) => i.name));
  const byChain = groupChains(report.checked.map((c) => ({ ...parseImageName(c.name)!, name: c.name, path: `${dir}/${c.name}` })));
  for (const [, checks] of byChain) {
    const { volume, base } = checks[0]!;
    const logPath = badLogPath(dir, volume, base);
    const bad = await readBadLog(logPath);
    for (const c of report.checked) {
      const n = parseImageName(c.name);
      if (!n || n.volume !== volume || n.base !== base) continue;
      if (c.ok) bad.delete(c.name);
      else bad.set(c.name, c.reason ?? 'failed');
    }
    for (const name of [...bad.keys()]) if (!existing.has(name)) bad.delete(name);
    if (bad.size === 0) await unlink(logPath).catch(() => {});
    else await writeFileAtomic(logPath, Buffer.from(formatBadLog(bad)));
  }
}

