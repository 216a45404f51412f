/**
 * A managed folder's processing settings (SPEC §6, §7): its time zone, whether it is
 * consolidated and retained, where weeks and months end, how long each kind of file is
 * kept, and how often images are re-verified. `resolvePolicySettings` takes what a
 * settings file or the command line gives (numbers and booleans may arrive as strings),
 * fills in the defaults and refuses anything it does not understand, naming the setting.
 */
import { UsageError } from '../../formats/errors.js';
import { WEEKDAY_NAMES, checkTimeZone, machineTimeZone, type Weekday } from './calendar.js';

export type RemovalMode = 'delete' | 'move';

export interface PolicySettings {
  /** IANA zone of the folder's business days. */
  timeZone: string;
  /** collapse incrementals into dailies, weeklies, monthlies (and rolling files) */
  consolidate: boolean;
  /** remove obsolete files (and roll monthlies when rollingMonths > 0) */
  retain: boolean;
  /** the weekday whose night builds the weekly; 0 = Sunday … 6 = Saturday */
  endOfWeek: Weekday;
  /** the day of the month whose night builds the monthly, 1..31, clamped to the month's length */
  endOfMonth: number;
  /** monthlies kept before the oldest is rolled into the -cr file; 0 = never roll */
  rollingMonths: number;
  /** days of raw incrementals kept (besides today's), counted back from now */
  keepIncrementalDays: number;
  /** days of dailies kept (besides today's), counted back from now */
  keepDailyDays: number;
  /** weeks of weeklies kept, counted back from now (7 days a week) */
  keepWeeklyWeeks: number;
  /** what happens to a removed file: deleted, or moved into the folder's Incrementals/ subfolder */
  removal: RemovalMode;
  /** re-verify every image, with its whole dependency path, every this many days */
  verifyEveryDays: number;
}

export interface SettingDoc {
  key: keyof PolicySettings;
  type: string;
  default: string;
  description: string;
}

/** The settings, for the documentation and `--help`. */
export const POLICY_SETTINGS_DOC: readonly SettingDoc[] = [
  { key: 'timeZone', type: 'IANA zone name', default: "the machine's zone", description: 'business days run from midnight to midnight in this zone (23 or 25 hours on DST days)' },
  { key: 'consolidate', type: 'boolean', default: 'true', description: 'collapse incrementals into -cd, -cd-cw, -cd-cm (and -cr); off for a weekly full/incremental schedule' },
  { key: 'retain', type: 'boolean', default: 'true', description: 'remove obsolete files and roll monthlies; off keeps every file' },
  { key: 'endOfWeek', type: 'weekday (sunday..saturday or 0..6)', default: 'saturday', description: 'the night after this day builds the weekly -cd-cw' },
  { key: 'endOfMonth', type: 'integer 1..31', default: '31', description: "the night after this day of the month builds the monthly -cd-cm; clamped to the month's length (31 = the last day)" },
  { key: 'rollingMonths', type: 'integer >= 0', default: '0', description: 'keep this many monthlies and roll older ones into one -cr file; 0 keeps every monthly' },
  { key: 'keepIncrementalDays', type: 'integer >= 0', default: '3', description: "days of raw incrementals kept besides today's (a file needed by a kept file is always kept)" },
  { key: 'keepDailyDays', type: 'integer >= 0', default: '14', description: "days of dailies (-cd) kept besides today's" },
  { key: 'keepWeeklyWeeks', type: 'integer >= 0', default: '8', description: 'weeks of weeklies (-cd-cw) kept' },
  { key: 'removal', type: 'delete | move', default: 'delete', description: 'move puts removed files into the Incrementals/ subfolder, which imagekeep then ignores' },
  { key: 'verifyEveryDays', type: 'integer >= 1', default: '7', description: 'every image is re-verified, with its whole dependency path, this often' },
];

/** The settings as a plain-text table. */
export function policySettingsText(): string {
  const rows = POLICY_SETTINGS_DOC.map((d) => [d.key, d.type, d.default, d.description]);
  const head = ['setting', 'value', 'default', 'meaning'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ');
  return [line(head), ...rows.map(line)].join('\n') + '\n';
}

export function defaultPolicySettings(timeZone: string = machineTimeZone()): PolicySettings {
  return {
    timeZone: checkTimeZone(timeZone),
    consolidate: true,
    retain: true,
    endOfWeek: 6,
    endOfMonth: 31,
    rollingMonths: 0,
    keepIncrementalDays: 3,
    keepDailyDays: 14,
    keepWeeklyWeeks: 8,
    removal: 'delete',
    verifyEveryDays: 7,
  };
}

function bad(key: string, value: unknown, want: string): UsageError {
  return new UsageError(`setting ${key}=${JSON.stringify(value)} is not ${want}`, { setting: key, value });
}

function toBoolean(key: string, v: unknown): boolean {
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') {
    const s = v.trim().toLowerCase();
    if (['true', 'yes', 'on', '1'].includes(s)) return true;
    if (['false', 'no', 'off', '0'].includes(s)) return false;
  }
  throw bad(key, v, 'true or false');
}

function toInteger(key: string, v: unknown, min: number, max: number): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) throw bad(key, v, `an integer from ${min} to ${max}`);
  return n;
}

export function parseWeekday(key: string, v: unknown): Weekday {
  if (typeof v === 'string') {
    const s = v.trim().toLowerCase();
    const i = WEEKDAY_NAMES.findIndex((n) => n === s || (s.length >= 3 && n.startsWith(s)));
    if (i >= 0) return i as Weekday;
  }
  return toInteger(key, v, 0, 6) as Weekday;
}

const MAX_DAYS = 36_500;

/**
 * Settings from `input` over `base` (default: the defaults). Keys not given keep the base's
 * value; an unknown key or a bad value is a UsageError naming it.
 */
export function resolvePolicySettings(input: Readonly<Record<string, unknown>>, base: PolicySettings = defaultPolicySettings()): PolicySettings {
  const s: PolicySettings = { ...base };
  const known = new Set<string>(POLICY_SETTINGS_DOC.map((d) => d.key));
  for (const [key, v] of Object.entries(input)) {
    if (v === undefined) continue;
    if (!known.has(key)) throw new UsageError(`unknown setting "${key}"; the settings are ${[...known].join(', ')}`, { setting: key });
    switch (key as keyof PolicySettings) {
      case 'timeZone':
        if (typeof v !== 'string') throw bad(key, v, 'an IANA time zone name');
        s.timeZone = checkTimeZone(v);
        break;
      case 'consolidate': s.consolidate = toBoolean(key, v); break;
      case 'retain': s.retain = toBoolean(key, v); break;
      case 'endOfWeek': s.endOfWeek = parseWeekday(key, v); break;
      case 'endOfMonth': s.endOfMonth = toInteger(key, v, 1, 31); break;
      case 'rollingMonths': s.rollingMonths = toInteger(key, v, 0, 1200); break;
      case 'keepIncrementalDays': s.keepIncrementalDays = toInteger(key, v, 0, MAX_DAYS); break;
      case 'keepDailyDays': s.keepDailyDays = toInteger(key, v, 0, MAX_DAYS); break;
      case 'keepWeeklyWeeks': s.keepWeeklyWeeks = toInteger(key, v, 0, Math.floor(MAX_DAYS / 7)); break;
      case 'removal':
        if (v !== 'delete' && v !== 'move') throw bad(key, v, 'delete or move');
        s.removal = v;
        break;
      case 'verifyEveryDays': s.verifyEveryDays = toInteger(key, v, 1, MAX_DAYS); break;
    }
  }
  return s;
}
