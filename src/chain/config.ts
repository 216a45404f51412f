/**
 * Where a folder's processing settings come from, weakest first: the defaults, the config
 * file's `defaults`, its entry for the folder, the folder's own `imagekeep.json`, then the
 * command line. The config file also lists the managed folders with a sort priority
 * (lower first, then alphabetical) and a concurrency limit.
 *
 *   { "concurrency": 2,
 *     "defaults": { "timeZone": "Europe/Berlin", "keepDailyDays": 14 },
 *     "folders": [ { "path": "/backups/server1", "priority": 1, "settings": { "rollingMonths": 12 } } ] }
 */
import { readFile } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { UsageError } from '../formats/errors.js';
import { defaultPolicySettings, resolvePolicySettings, type PolicySettings } from './policy/settings.js';

export const FOLDER_SETTINGS_FILE = 'imagekeep.json';

export interface ManagedFolder {
  path: string;
  priority: number;
  settings: PolicySettings;
}

export interface ProcessConfig {
  concurrency: number;
  folders: ManagedFolder[];
}

async function readJson(path: string, what: string): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new UsageError(`${what} ${path} cannot be read`);
  }
  try {
    const doc: unknown = JSON.parse(text);
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw new Error('not an object');
    return doc as Record<string, unknown>;
  } catch (e) {
    throw new UsageError(`${what} ${path} is not a JSON object: ${(e as Error).message}`);
  }
}

function objectAt(doc: Record<string, unknown>, key: string, where: string): Record<string, unknown> {
  const v = doc[key] ?? {};
  if (typeof v !== 'object' || Array.isArray(v)) throw new UsageError(`${where}: "${key}" must be an object of settings`);
  return v as Record<string, unknown>;
}

/** The folders to process: those named on the command line, else every folder of the config file. */
export async function loadProcessConfig(paths: string[], configFile: string | undefined, flags: Record<string, unknown>): Promise<ProcessConfig> {
  const config = configFile ? await readJson(configFile, 'config file') : null;
  if (configFile && !config) throw new UsageError(`config file ${configFile} does not exist`);
  const where = configFile ?? '';
  const defaults = config ? objectAt(config, 'defaults', where) : {};
  const entries = new Map<string, { priority: number; settings: Record<string, unknown> }>();
  const list = config?.folders ?? [];
  if (!Array.isArray(list)) throw new UsageError(`${where}: "folders" must be a list`);
  for (const [i, item] of list.entries()) {
    const e = item as Record<string, unknown>;
    if (!e || typeof e.path !== 'string') throw new UsageError(`${where}: folders[${i}] needs a "path"`);
    const priority = e.priority ?? 100;
    if (typeof priority !== 'number') throw new UsageError(`${where}: folders[${i}].priority must be a number`);
    entries.set(resolve(e.path), { priority, settings: objectAt(e, 'settings', `${where} folders[${i}]`) });
  }
  const chosen = paths.length > 0 ? paths.map((p) => resolve(p)) : [...entries.keys()];
  if (chosen.length === 0) throw new UsageError('name a folder to process, or give --config FILE listing folders');
  const folders: ManagedFolder[] = [];
  for (const path of chosen) {
    let s = resolvePolicySettings(defaults, defaultPolicySettings());
    const entry = entries.get(path);
    if (entry) s = resolvePolicySettings(entry.settings, s);
    const own = await readJson(join(path, FOLDER_SETTINGS_FILE), 'folder settings');
    if (own) s = resolvePolicySettings(objectAt(own, 'settings', join(path, FOLDER_SETTINGS_FILE)), s);
    s = resolvePolicySettings(flags, s);
    folders.push({ path, priority: entry?.priority ?? 100, settings: s });
  }
  folders.sort((a, b) => a.priority - b.priority || basename(a.path).localeCompare(basename(b.path)) || a.path.localeCompare(b.path));
  const concurrency = config?.concurrency ?? 1;
  if (typeof concurrency !== 'number' || !Number.isInteger(concurrency) || concurrency < 1) throw new UsageError(`${where}: "concurrency" must be a whole number >= 1`);
  return { concurrency, folders };
}

/** The time zone of a folder's business days: its imagekeep.json, else the machine's. */
export async function folderTimeZone(folder: string): Promise<string> {
  const own = await readJson(join(resolve(folder), FOLDER_SETTINGS_FILE), 'folder settings');
  const settings = own ? objectAt(own, 'settings', join(folder, FOLDER_SETTINGS_FILE)) : {};
  return resolvePolicySettings({ timeZone: settings.timeZone }).timeZone;
}
