/**
 * The nightly plan of one chain (SPEC §7), pure: from the files of one (volume, base) as they
 * are now, the settings and the time, the collapses and removals to perform, in order. The
 * planner simulates as it goes: each planned collapse joins the file set, so the weekly of
 * a night is built from the dailies planned just before it, and a removal is decided on the
 * chain as it will be after every collapse.
 *
 * Consolidation. The business days from the oldest day with work pending up to yesterday
 * are walked in calendar order (today is never collapsed; missed nights are caught up).
 * For each day d:
 *   1. daily: d's points after the newest file of level >= daily → `-cd` at d's last point;
 *   2. if d is the end-of-week day: everything after the newest file of level >= weekly, up
 *      to the last point on or before d → `-cd-cw`;
 *   3. if d is the (clamped) end-of-month day: everything after the newest file of level >=
 *      monthly, up to the last point on or before d → `-cd-cm`, or `-cd-cw-cm` when d is
 *      also the end-of-week day;
 *   4. rolling (rollingMonths = N > 0, and only when consolidation and retention are both on:
 *      it is a collapse, and the retention of monthlies; with retention off each month would
 *      add a -cr and remove none): when more than N monthlies follow the newest `-cr`, the oldest
 *      is rolled: a new `-cr` covering 1..its last, named as that monthly plus `-cr` (after
 *      missed months, all monthlies beyond N at once, named after the newest of them).
 * A period without any point after the newest file of its level yields nothing. Sources are
 * the fewest files covering the range: the dependency path from the range's last point back
 * to its first, inside the range.
 *
 * Retention (on the chain as it is after the collapses). A file is a candidate for removal
 * when
 *   - another file ending at the same point covers as much or more (it wins the dependency-path
 *     choice, SPEC §4): its point in time stays available through that file and no path
 *     passes through it, so it goes at once, whatever its age;
 *   - it is a raw incremental, daily or weekly whose business day (the day of its end point)
 *     is before today − keepIncrementalDays, today − keepDailyDays or today − 7·keepWeeklyWeeks
 *     (so "keep 3 days" keeps today's files and those of the three days before);
 *   - it is a `-cr` or a monthly ending before the newest `-cr` (replaced, or rolled into it).
 * Monthlies are never removed by age (only rolled), bases never. A candidate on the
 * dependency path of any file that stays is kept, and so is the newest point's file. The
 * removals come after every collapse, newest point first, so that a run killed between two
 * removals leaves no remaining file whose path lost a file.
 *
 * Where SPEC §7 is silent:
 *   - a weekly or monthly "on" day d is built by the first run after d has ended, like d's daily;
 *   - a collapse's age is the day of its end point (a weekly whose week ended without images
 *     is as old as its last point);
 *   - `removal: move` applies to every removal (the executor moves into Incrementals/);
 *   - a chain whose newest point cannot be restored (a missing link or base) gets no plan: a
 *     ChainBrokenError; a kept orphan whose own path is broken protects what is left of it;
 *   - a second run on the same night plans nothing (the plan depends on the files only).
 */
import { ChainBrokenError, ImagekeepError } from '../../formats/errors.js';
import { LEVEL_BITS } from '../image/layout.js';
import { chainKey, formatImageName, levelRank, parseImageName } from '../names.js';
import { addDays, checkTimeZone, dayOf, endOfMonthIn, weekdayName, weekdayOf, type Day } from './calendar.js';
import type { PolicySettings, RemovalMode } from './settings.js';

/** One image file of the chain, as it is in the folder (a base has first = last = 0). */
export interface PlanFile {
  name: string;
  volume: string;
  base: number;
  first: number;
  last: number;
  levelBits: number;
  /** capture time of the end point, ms since the epoch (from the header, never the mtime) */
  pointTime: number;
}

export type CollapseLevel = 'daily' | 'weekly' | 'monthly' | 'rolling';

export interface CollapseAction {
  kind: 'collapse';
  level: CollapseLevel;
  /** the business day whose night is due this collapse */
  day: Day;
  name: string;
  first: number;
  last: number;
  levelBits: number;
  /** the end point's capture time (the new file's header time; its mtime is that of sources[0]) */
  pointTime: number;
  /** the files to read, newest first: the dependency path from `last` back to `first` */
  sources: string[];
  reason: string;
}

export interface RemoveAction {
  kind: 'remove';
  name: string;
  /** the folder's setting: delete, or move into Incrementals/ */
  removal: RemovalMode;
  reason: string;
}

export type Action = CollapseAction | RemoveAction;

export interface Plan {
  /** the business day of `now`: it and later days are never collapsed */
  today: Day;
  /** in execution order: every collapse (calendar order), then every removal (newest point first) */
  actions: Action[];
}

const { cd, cw, cm, cr } = LEVEL_BITS;
const RANK_DAILY = 1;
const RANK_WEEKLY = 2;
const RANK_MONTHLY = 3;
const RANK_ROLLING = 4;

function inc(n: number): string {
  return `i${String(n).padStart(3, '0')}`;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** A chain's files with the dependency-path choice of SPEC §4 (as src/chain/path.ts). */
class ChainSet {
  readonly byName = new Map<string, PlanFile>();
  private readonly byLast = new Map<number, PlanFile[]>();

  constructor(readonly volume: string, readonly baseNumber: number, files: readonly PlanFile[]) {
    for (const f of files) this.add(f);
  }

  add(f: PlanFile): void {
    this.byName.set(f.name, f);
    this.ends = undefined;
    const list = this.byLast.get(f.last);
    if (list) list.push(f);
    else this.byLast.set(f.last, [f]);
  }

  remove(name: string): void {
    const f = this.byName.get(name);
    if (!f) return;
    this.byName.delete(name);
    this.ends = undefined;
    const list = this.byLast.get(f.last)!.filter((x) => x !== f);
    if (list.length) this.byLast.set(f.last, list);
    else this.byLast.delete(f.last);
  }

  get base(): PlanFile | undefined {
    return this.byLast.get(0)?.[0];
  }

  /** The file ending at `point` that covers the most (not starting before `minFirst`); the higher level on a tie. */
  bestAt(point: number, minFirst = 1): PlanFile | undefined {
    let best: PlanFile | undefined;
    for (const f of this.byLast.get(point) ?? []) {
      if (f.first < minFirst) continue;
      if (!best || f.first < best.first || (f.first === best.first && levelRank(f.levelBits) > levelRank(best.levelBits))) best = f;
    }
    return best;
  }

  newestPoint(): number {
    let n = 0;
    for (const p of this.byLast.keys()) n = Math.max(n, p);
    return n;
  }

  /** ends[r]: the end of the newest file of level rank r or higher (cached until the set changes) */
  private ends: number[] | undefined;

  /** The end of the newest file of level `rank` or higher; 0 (the base) when there is none. */
  endAtLeast(rank: number): number {
    if (!this.ends) {
      const ends = [0, 0, 0, 0, 0];
      for (const f of this.byName.values()) {
        const r = levelRank(f.levelBits);
        ends[r] = Math.max(ends[r]!, f.last);
      }
      for (let r = ends.length - 2; r >= 0; r--) ends[r] = Math.max(ends[r]!, ends[r + 1]!);
      this.ends = ends;
    }
    return this.ends[Math.min(rank, this.ends.length - 1)]!;
  }

  /**
   * The dependency path of `target`, newest first, ending with the base. Strict: a missing
   * link throws ChainBrokenError. Lenient: the path as far as it goes.
   */
  path(target: PlanFile, strict: boolean): PlanFile[] {
    const out = [target];
    if (target.last === 0) return out;
    let cur = target.first - 1;
    while (cur > 0) {
      const next = this.bestAt(cur);
      if (!next) {
        if (!strict) return out;
        throw new ChainBrokenError(`${target.name} needs a file of chain ${chainKey(this.volume, this.baseNumber)} that ends at incremental ${cur}, and there is none: the chain is broken, so nothing is collapsed or removed (restore the missing file from a replica)`, { missingPoint: cur });
      }
      out.push(next);
      cur = next.first - 1;
    }
    const base = this.base;
    if (base) out.push(base);
    else if (strict) throw new ChainBrokenError(`${target.name} needs the base ${chainKey(this.volume, this.baseNumber)}.spf, which is missing: the chain is broken`, { missingPoint: 0 });
    return out;
  }

  /** The fewest files that together cover exactly first..last, newest first. */
  cover(first: number, last: number, what: string): PlanFile[] {
    const out: PlanFile[] = [];
    let cur = last;
    while (cur >= first) {
      const next = this.bestAt(cur, first);
      if (!next) {
        throw new ChainBrokenError(`cannot build ${what}: no file of chain ${chainKey(this.volume, this.baseNumber)} ends at incremental ${cur} inside ${inc(first)}..${inc(last)}; the chain is broken or was edited by hand`, { missingPoint: cur });
      }
      out.push(next);
      cur = next.first - 1;
    }
    return out;
  }
}

function checkFiles(files: readonly PlanFile[]): { volume: string; base: number } {
  const first = files[0]!;
  const names = new Set<string>();
  for (const f of files) {
    const what = `planNight: ${f.name}`;
    if (f.volume !== first.volume || f.base !== first.base) {
      throw new ImagekeepError('PLAN_INPUT', `${what} belongs to chain ${chainKey(f.volume, f.base)}, not ${chainKey(first.volume, first.base)}: plan one chain at a time`);
    }
    if (names.has(f.name)) throw new ImagekeepError('PLAN_INPUT', `${what} is listed twice`);
    names.add(f.name);
    const parsed = parseImageName(f.name);
    if (!parsed || formatImageName(f) !== f.name || parsed.levelBits !== f.levelBits) {
      throw new ImagekeepError('PLAN_INPUT', `${what}: the name does not match volume ${f.volume}, base ${f.base}, last ${f.last}, level bits ${f.levelBits}`);
    }
    const rangeOk = f.last === 0 ? f.first === 0 && f.levelBits === 0 : Number.isInteger(f.first) && f.first >= 1 && f.first <= f.last;
    if (!rangeOk) throw new ImagekeepError('PLAN_INPUT', `${what} covers ${f.first}..${f.last}, which is not a range of its chain`);
    if (!Number.isFinite(f.pointTime)) throw new ImagekeepError('PLAN_INPUT', `${what} has no point time`);
  }
  return { volume: first.volume, base: first.base };
}

/** The business day of every point that has a file, and the points in order. */
function pointDays(files: readonly PlanFile[], zone: string, key: string): { points: number[]; dayOfPoint: Map<number, Day> } {
  const time = new Map<number, number>();
  for (const f of files) if (!time.has(f.last)) time.set(f.last, f.pointTime);
  const points = [...time.keys()].sort((a, b) => a - b);
  for (let i = 1; i < points.length; i++) {
    const [a, b] = [points[i - 1]!, points[i]!];
    if (time.get(b)! < time.get(a)!) {
      throw new ImagekeepError('POINT_ORDER', `chain ${key}: point ${b} was captured before point ${a} (${new Date(time.get(b)!).toISOString()} < ${new Date(time.get(a)!).toISOString()}); points must move forward in time, so its business days cannot be told`, { points: [a, b] });
    }
  }
  const dayOfPoint = new Map<number, Day>();
  for (const p of points) dayOfPoint.set(p, dayOf(time.get(p)!, zone));
  return { points, dayOfPoint };
}

/** The plan of one chain for the night of `nowMs`. Pure: reads nothing, writes nothing. */
export function planNight(files: readonly PlanFile[], settings: PolicySettings, nowMs: number): Plan {
  const zone = checkTimeZone(settings.timeZone);
  const today = dayOf(nowMs, zone);
  const actions: Action[] = [];
  if (files.length === 0) return { today, actions };
  const { volume, base } = checkFiles(files);
  const key = chainKey(volume, base);
  const chain = new ChainSet(volume, base, files);
  if (!chain.base) throw new ChainBrokenError(`chain ${key} has no base ${key}.spf: the chain is broken, so nothing is collapsed or removed`, { missingPoint: 0 });
  const { points, dayOfPoint } = pointDays(files, zone, key);
  const newestPoint = chain.newestPoint();
  // A chain whose newest point cannot be restored needs an administrator, not a plan.
  chain.path(chain.bestAt(newestPoint) ?? chain.base, true);

  // Points are in time order (checked), so their days never decrease.
  const pointDayList = points.map((p) => dayOfPoint.get(p)!);
  const lastPointUpTo = (d: Day): number => {
    let lo = 0;
    let hi = points.length; // the first index whose day is after d
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (pointDayList[mid]! <= d) lo = mid + 1;
      else hi = mid;
    }
    return lo === 0 ? 0 : points[lo - 1]!;
  };
  const lastPointOn = (d: Day): number | undefined => {
    const p = lastPointUpTo(d);
    return p > 0 && dayOfPoint.get(p) === d ? p : undefined;
  };

  const collapse = (level: CollapseLevel, day: Day, first: number, last: number, levelBits: number, why: string): PlanFile => {
    const name = formatImageName({ volume, base, last, levelBits });
    const sources = chain.cover(first, last, name);
    if (chain.byName.has(name)) {
      // Cannot happen on a chain this planner shaped: a file of this level ending there would have moved the range's start past it.
      throw new ImagekeepError('PLAN_CONFLICT', `chain ${key}: ${name} is due, but a file of that name already exists`);
    }
    const file: PlanFile = { name, volume, base, first, last, levelBits, pointTime: sources[0]!.pointTime };
    chain.add(file);
    actions.push({
      kind: 'collapse', level, day, name, first, last, levelBits, pointTime: file.pointTime, sources: sources.map((s) => s.name),
      reason: `${why}: points ${inc(first)}..${inc(last)} from ${plural(sources.length, 'file')}`,
    });
    return file;
  };

  const rolling = settings.consolidate && settings.retain && settings.rollingMonths > 0;
  // Rolling keeps the newest N monthlies after the -cr and rolls the others into one new -cr,
  // named after the newest of them. Once a month that is the single oldest monthly; after
  // missed months (or a smaller N) all at once, so no short-lived -cr is written.
  const roll = (day: Day | undefined): void => {
    const rollEnd = chain.endAtLeast(RANK_ROLLING);
    const monthlies = [...chain.byName.values()].filter((f) => levelRank(f.levelBits) === RANK_MONTHLY && f.last > rollEnd).sort((a, b) => a.last - b.last);
    const excess = monthlies.length - settings.rollingMonths;
    if (excess <= 0) return;
    const rolled = monthlies[excess - 1]!;
    const oldRoll = rollEnd > 0 ? chain.bestAt(rollEnd) : undefined;
    const names = monthlies.slice(0, excess).map((m) => m.name).join(', ');
    collapse('rolling', day ?? dayOfPoint.get(rolled.last)!, 1, rolled.last, rolled.levelBits | cr,
      `rolling: ${monthlies.length === 1 ? '1 monthly' : `${monthlies.length} monthlies`} after the rolling file, ${settings.rollingMonths} kept; ${names} rolled into a new rolling file` +
      (oldRoll ? ` that replaces ${oldRoll.name}` : ''));
  };

  if (settings.consolidate) {
    if (rolling) roll(undefined);
    // Walk from the day of the oldest level's end: every period due since then is decided below.
    const oldestEnd = Math.min(chain.endAtLeast(RANK_DAILY), chain.endAtLeast(RANK_WEEKLY), chain.endAtLeast(RANK_MONTHLY));
    if (newestPoint > oldestEnd) {
      for (let d = dayOfPoint.get(oldestEnd)!; d < today; d = addDays(d, 1)) {
        const label = `${weekdayName(d)} ${d}`;
        const dayLast = lastPointOn(d);
        const dailyEnd = chain.endAtLeast(RANK_DAILY);
        if (dayLast !== undefined && dayLast > dailyEnd) {
          collapse('daily', d, dailyEnd + 1, dayLast, cd, `daily of ${label}`);
        }
        const endOfWeek = weekdayOf(d) === settings.endOfWeek;
        const upTo = lastPointUpTo(d);
        const lastNote = upTo > 0 && dayOfPoint.get(upTo) !== d ? ` (no image on ${d}: named after the last point before it, on ${dayOfPoint.get(upTo)})` : '';
        const weeklyEnd = chain.endAtLeast(RANK_WEEKLY);
        if (endOfWeek && upTo > weeklyEnd) {
          collapse('weekly', d, weeklyEnd + 1, upTo, cd | cw, `weekly of the week ending ${label}${lastNote}`);
        }
        const monthEnd = endOfMonthIn(d, settings.endOfMonth);
        const monthlyEnd = chain.endAtLeast(RANK_MONTHLY);
        if (d === monthEnd && upTo > monthlyEnd) {
          const clamped = Number(monthEnd.slice(8)) !== settings.endOfMonth ? ` (end of month ${settings.endOfMonth}, clamped to the month's ${Number(monthEnd.slice(8))} days)` : '';
          const both = endOfWeek ? '; -cw too: the end of week falls on the same day' : '';
          collapse('monthly', d, monthlyEnd + 1, upTo, endOfWeek ? cd | cw | cm : cd | cm, `monthly of the month ending ${label}${clamped}${lastNote}${both}`);
          if (rolling) roll(d);
        }
      }
    }
  }

  if (settings.retain) {
    for (const r of retention(chain, settings, today, zone)) actions.push(r);
  }
  return { today, actions };
}

function retention(chain: ChainSet, settings: PolicySettings, today: Day, zone: string): RemoveAction[] {
  const newest = chain.bestAt(chain.newestPoint()) ?? chain.base;
  const rollEnd = chain.endAtLeast(RANK_ROLLING);
  const keepFrom = [addDays(today, -settings.keepIncrementalDays), addDays(today, -settings.keepDailyDays), addDays(today, -7 * settings.keepWeeklyWeeks)];
  const kinds = ['raw incremental', 'daily', 'weekly'];
  const kept = [`${plural(settings.keepIncrementalDays, 'day')} of raw incrementals`, `${plural(settings.keepDailyDays, 'day')} of dailies`, `${plural(settings.keepWeeklyWeeks, 'week')} of weeklies`];
  const candidates = new Map<string, string>();
  for (const f of chain.byName.values()) {
    if (f.last === 0 || f === newest) continue;
    const best = chain.bestAt(f.last)!;
    if (best !== f) {
      candidates.set(f.name, `covered by ${best.name}, which ends at the same point and covers ${inc(best.first)}..${inc(best.last)}: nothing depends on it`);
      continue;
    }
    const rank = levelRank(f.levelBits);
    const day = dayOf(f.pointTime, zone);
    if (rank < RANK_MONTHLY && day < keepFrom[rank]!) {
      candidates.set(f.name, `${kinds[rank]} of ${day}, older than the ${kept[rank]} kept (from ${keepFrom[rank]}), and no kept file depends on it`);
    } else if (rank >= RANK_MONTHLY && f.last < rollEnd) {
      const what = rank === RANK_ROLLING ? 'rolling file replaced by' : 'monthly rolled into';
      candidates.set(f.name, `${what} ${chain.bestAt(rollEnd)!.name}, and no kept file depends on it`);
    }
  }
  // Keep every file on the path of a file that stays. The path of a file on a path is the
  // rest of that path, so each file needs walking once.
  const walked = new Set<string>();
  for (const f of chain.byName.values()) {
    if (candidates.has(f.name) || walked.has(f.name)) continue;
    for (const p of chain.path(f, false)) {
      if (p !== f && walked.has(p.name)) break;
      walked.add(p.name);
      candidates.delete(p.name);
    }
  }
  const removals = [...candidates.keys()].map((n) => chain.byName.get(n)!)
    .sort((a, b) => b.last - a.last || levelRank(a.levelBits) - levelRank(b.levelBits) || a.name.localeCompare(b.name));
  for (const f of removals) chain.remove(f.name);
  return removals.map((f) => ({ kind: 'remove', name: f.name, removal: settings.removal, reason: candidates.get(f.name)! }));
}

/**
 * The chain after `plan` (pure; for dry runs and tests): collapses add their file, removals
 * drop theirs. Throws when the plan does not fit the files (a source or file missing, a name taken).
 */
export function applyPlan(files: readonly PlanFile[], plan: Plan): PlanFile[] {
  const out = new Map(files.map((f) => [f.name, f]));
  for (const a of plan.actions) {
    if (a.kind === 'collapse') {
      const missing = a.sources.filter((s) => !out.has(s));
      if (missing.length) throw new ImagekeepError('PLAN_MISMATCH', `${a.name}: its sources ${missing.join(', ')} are not in the folder`);
      if (out.has(a.name)) throw new ImagekeepError('PLAN_MISMATCH', `${a.name} exists already`);
      const p = parseImageName(a.name)!;
      out.set(a.name, { name: a.name, volume: p.volume, base: p.base, first: a.first, last: a.last, levelBits: a.levelBits, pointTime: a.pointTime });
    } else {
      if (!out.delete(a.name)) throw new ImagekeepError('PLAN_MISMATCH', `${a.name} is to be removed but is not in the folder`);
    }
  }
  return [...out.values()];
}
