/**
 * Business days in an IANA time zone (SPEC §4): a day runs from midnight to midnight on
 * the folder's wall clock, so it lasts 23 or 25 hours when DST starts or ends. Only
 * `Intl.DateTimeFormat` is used to learn a zone's offset at an instant; every other
 * computation is plain arithmetic on civil dates ('YYYY-MM-DD'), done in UTC where days
 * are always 24 hours long.
 *
 * Wall time → instant follows the rule most calendars use (RFC 5545, Temporal's
 * "compatible"): a wall time that occurs twice (the repeated hour when clocks go back) is
 * the earlier instant; a wall time that does not exist (the skipped hour when clocks go
 * forward) is shifted forward by the length of the gap. `startOfDay` relies on that, so
 * it is the first instant of the day even where midnight itself is skipped.
 * `parseLocalTime` refuses a skipped wall time instead of shifting it: a `--now` or
 * `--at` the user typed should mean exactly what it says.
 */
import { UsageError } from '../../formats/errors.js';

/** A civil date, 'YYYY-MM-DD'. Compares correctly as a string (years 1000..9999). */
export type Day = string;

/** 0 = Sunday … 6 = Saturday, as `Date.prototype.getUTCDay`. */
export type Weekday = 0 | 1 | 2 | 3 | 4 | 5 | 6;

export const WEEKDAY_NAMES = ['sunday', 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday'] as const;

const DAY_MS = 86_400_000;
const DAY_RE = /^(\d{4})-(\d{2})-(\d{2})$/;

interface Civil {
  year: number;
  month: number; // 1..12
  day: number;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

function formatterFor(zone: string): Intl.DateTimeFormat {
  let f = formatters.get(zone);
  if (!f) {
    try {
      f = new Intl.DateTimeFormat('en-US', {
        timeZone: zone, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit',
        hour: '2-digit', minute: '2-digit', second: '2-digit',
      });
    } catch {
      throw new UsageError(`time zone "${zone}" is not an IANA time zone name such as Europe/Berlin, America/New_York or UTC`, { timeZone: zone });
    }
    formatters.set(zone, f);
  }
  return f;
}

/** The zone's canonical name; throws UsageError for a name the runtime does not know. */
export function checkTimeZone(zone: string): string {
  if (typeof zone !== 'string' || zone.trim() === '') throw new UsageError('the time zone is empty; give an IANA name such as Europe/Berlin', { timeZone: zone });
  return formatterFor(zone).resolvedOptions().timeZone;
}

export function isTimeZone(zone: string): boolean {
  try {
    checkTimeZone(zone);
    return true;
  } catch {
    return false;
  }
}

/** The machine's zone (the default of the folder setting); UTC when the runtime has none. */
export function machineTimeZone(): string {
  const z = new Intl.DateTimeFormat().resolvedOptions().timeZone;
  return z && isTimeZone(z) ? z : 'UTC';
}

/** Wall-clock time at `ms` in `zone`, expressed as if it were UTC, in whole seconds. */
function wallOf(ms: number, zone: string): number {
  const parts = formatterFor(zone).formatToParts(new Date(ms));
  const get = (type: Intl.DateTimeFormatPartTypes): number => Number(parts.find((p) => p.type === type)?.value);
  return Date.UTC(get('year'), get('month') - 1, get('day'), get('hour'), get('minute'), get('second'));
}

/** The zone's offset from UTC at instant `ms` (positive east of Greenwich), in ms. */
export function zoneOffsetMs(ms: number, zone: string): number {
  const s = Math.floor(ms / 1000) * 1000;
  return wallOf(s, zone) - s;
}

function civilOf(day: Day): Civil {
  const m = DAY_RE.exec(day);
  if (!m) throw new UsageError(`"${day}" is not a day in the form YYYY-MM-DD`);
  const c = { year: Number(m[1]), month: Number(m[2]), day: Number(m[3]) };
  if (c.month < 1 || c.month > 12 || c.day < 1 || c.day > daysInMonth(c.year, c.month)) throw new UsageError(`"${day}" is not a day of the calendar`);
  return c;
}

function dayFromUtcMs(ms: number): Day {
  const d = new Date(ms);
  return `${String(d.getUTCFullYear()).padStart(4, '0')}-${String(d.getUTCMonth() + 1).padStart(2, '0')}-${String(d.getUTCDate()).padStart(2, '0')}`;
}

function utcMsOfDay(day: Day): number {
  const c = civilOf(day);
  return Date.UTC(c.year, c.month - 1, c.day);
}

export function isDay(text: string): boolean {
  try {
    civilOf(text);
    return true;
  } catch {
    return false;
  }
}

export function daysInMonth(year: number, month: number): number {
  return new Date(Date.UTC(year, month, 0)).getUTCDate();
}

// Intl formatting costs some 20 µs; a chain's planning asks for the same point times night after night.
const dayMemo = new Map<string, Map<number, Day>>();
const DAY_MEMO_LIMIT = 100_000;

/** The business day of instant `ms` in `zone`. */
export function dayOf(ms: number, zone: string): Day {
  if (!Number.isFinite(ms)) throw new UsageError(`${ms} is not a time`);
  let memo = dayMemo.get(zone);
  if (!memo) dayMemo.set(zone, (memo = new Map()));
  let day = memo.get(ms);
  if (day === undefined) {
    if (memo.size >= DAY_MEMO_LIMIT) memo.clear();
    day = dayFromUtcMs(wallOf(ms, zone));
    memo.set(ms, day);
  }
  return day;
}

export function addDays(day: Day, n: number): Day {
  return dayFromUtcMs(utcMsOfDay(day) + n * DAY_MS);
}

/** b − a in calendar days (positive when b is later). */
export function daysBetween(a: Day, b: Day): number {
  return Math.round((utcMsOfDay(b) - utcMsOfDay(a)) / DAY_MS);
}

export function weekdayOf(day: Day): Weekday {
  return new Date(utcMsOfDay(day)).getUTCDay() as Weekday;
}

export function weekdayName(day: Day): string {
  const n = WEEKDAY_NAMES[weekdayOf(day)];
  return n.charAt(0).toUpperCase() + n.slice(1, 3);
}

export function lastDayOfMonth(day: Day): Day {
  const c = civilOf(day);
  return `${day.slice(0, 8)}${String(daysInMonth(c.year, c.month)).padStart(2, '0')}`;
}

/** The end-of-month day of `day`'s month for setting `endOfMonth` (1..31), clamped to the month's length. */
export function endOfMonthIn(day: Day, endOfMonth: number): Day {
  const c = civilOf(day);
  return `${day.slice(0, 8)}${String(Math.min(endOfMonth, daysInMonth(c.year, c.month))).padStart(2, '0')}`;
}

/**
 * Wall time (as a UTC ms value) → instant. Returns every instant showing that wall time
 * (one; two in a repeated hour; none in a skipped hour) and the two offsets around it.
 */
function instantsOfWall(wall: number, zone: string): { found: number[]; before: number; after: number } {
  // The instant lies within ±18 h of `wall`, and zones do not change offset twice within a day.
  const before = zoneOffsetMs(wall - DAY_MS, zone);
  const after = zoneOffsetMs(wall + DAY_MS, zone);
  const found = [...new Set([wall - before, wall - after])].filter((c) => c + zoneOffsetMs(c, zone) === wall).sort((a, b) => a - b);
  return { found, before, after };
}

/** The first instant of `day` in `zone` (its midnight, or the end of a gap that swallowed midnight). */
export function startOfDay(day: Day, zone: string): number {
  const wall = utcMsOfDay(day);
  const { found, before, after } = instantsOfWall(wall, zone);
  if (found.length > 0) return found[0]!;
  // Midnight is skipped: the day starts at the transition. Search between the instant
  // that shows the day before and the one that shows this day (a gap of at most a day).
  let lo = wall - after; // shows a wall time before midnight
  let hi = wall - before; // shows a wall time after midnight
  if (lo > hi) [lo, hi] = [hi, lo];
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (dayOf(mid, zone) >= day) hi = mid;
    else lo = mid;
  }
  return hi;
}

/** Hours in `day` (23, 24 or 25 around DST changes; other values in a few historic zones). */
export function dayLengthHours(day: Day, zone: string): number {
  return (startOfDay(addDays(day, 1), zone) - startOfDay(day, zone)) / 3_600_000;
}

const TIME_RE = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?\s*(Z|[+-]\d{2}(?::?\d{2})?)?)?$/i;

/**
 * An ISO-8601 time for `--now`/`--at`: `2026-03-29`, `2026-03-29T01:30`, `…:45`, `…:45.123`,
 * optionally with `Z` or an offset (`+02:00`, `+0200`, `+02`). An explicit offset or Z wins;
 * without one the wall time is read in `zone`; a date alone is the start of that day. A wall
 * time in a repeated hour is its first occurrence; one in a skipped hour is refused.
 */
export function parseLocalTime(text: string, zone: string, what = 'the time'): number {
  const m = TIME_RE.exec(text.trim());
  const example = 'such as 2026-11-22T13:00, 2026-11-22T13:00:00Z or 2026-11-22T13:00+01:00';
  if (!m) throw new UsageError(`${what} "${text}" is not an ISO-8601 time ${example}`);
  const [, ys, mos, ds, hs, mins, ss, frac, off] = m;
  const year = Number(ys), month = Number(mos), day = Number(ds);
  const hour = Number(hs ?? 0), minute = Number(mins ?? 0), second = Number(ss ?? 0);
  const millis = frac ? Math.floor(Number(`0.${frac}`) * 1000) : 0;
  if (month < 1 || month > 12 || day < 1 || day > daysInMonth(year, month) || hour > 23 || minute > 59 || second > 59) {
    throw new UsageError(`${what} "${text}" is not a valid date and time ${example}`);
  }
  const wall = Date.UTC(year, month - 1, day, hour, minute, second, millis);
  if (off) {
    if (/^z$/i.test(off)) return wall;
    const om = /^([+-])(\d{2}):?(\d{2})?$/.exec(off)!;
    const oh = Number(om[2]), omin = Number(om[3] ?? 0);
    if (oh > 23 || omin > 59) throw new UsageError(`${what} "${text}" has an impossible UTC offset ${off}`);
    return wall - (om[1] === '-' ? -1 : 1) * (oh * 3_600_000 + omin * 60_000);
  }
  checkTimeZone(zone);
  if (hs === undefined) return startOfDay(dayFromUtcMs(wall), zone);
  const { found, before, after } = instantsOfWall(wall, zone);
  if (found.length === 0) {
    const minutes = Math.round((after - before) / 60_000);
    throw new UsageError(`${what} "${text}" does not exist in ${zone}: the clocks skip ${minutes} minutes there at that time (a DST change); give a time outside the gap or an explicit offset such as ${formatOffset(before)}`, { zone });
  }
  return found[0]!;
}

function formatOffset(ms: number): string {
  const sign = ms < 0 ? '-' : '+';
  const minutes = Math.round(Math.abs(ms) / 60_000);
  return `${sign}${String(Math.floor(minutes / 60)).padStart(2, '0')}:${String(minutes % 60).padStart(2, '0')}`;
}

/** `ms` as local ISO time with its offset, e.g. 2026-03-29T03:00:00+02:00 (for messages and dry runs). */
export function formatLocalTime(ms: number, zone: string): string {
  const offset = zoneOffsetMs(ms, zone);
  const wall = new Date(Math.floor(ms / 1000) * 1000 + offset).toISOString().slice(0, 19);
  return `${wall}${formatOffset(offset)}`;
}
