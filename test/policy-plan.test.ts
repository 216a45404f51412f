// Proves the nightly planner follows SPEC §7 rule by rule (daily, weekly, monthly, rolling, retention, catch-up, DST days), and over months of simulated nights never breaks a dependency path.
import t, { type Test } from 'tap';
import { dependencyPath } from '../src/chain/path.js';
import { formatImageName, levelRank } from '../src/chain/names.js';
import { LEVEL_BITS, type ImageHeader } from '../src/chain/image/layout.js';
import type { ChainFile } from '../src/chain/folder.js';
import { addDays, dayLengthHours, dayOf, endOfMonthIn, parseLocalTime, startOfDay, weekdayOf, type Day } from '../src/chain/policy/calendar.js';
import { defaultPolicySettings, type PolicySettings } from '../src/chain/policy/settings.js';
import { applyPlan, planNight, type CollapseAction, type Plan, type PlanFile } from '../src/chain/policy/plan.js';
import { Prng } from '../src/devkit/prng.js';

const { cd, cw, cm, cr } = LEVEL_BITS;
const BERLIN = 'Europe/Berlin';
const HOUR = 3_600_000;

function settings(o: Partial<PolicySettings> = {}, zone = BERLIN): PolicySettings {
  return { ...defaultPolicySettings(zone), ...o };
}

/** C_VOL-b001-iNNN<suffix>.spi */
function i(n: number, suffix = ''): string {
  return `C_VOL-b001-i${String(n).padStart(3, '0')}${suffix}.spi`;
}
const B = 'C_VOL-b001.spf';

/** As the folder layer gives them to qp; the path code reads only names, ranges and levels. */
function asChainFile(f: PlanFile): ChainFile {
  return { ...f, path: `/folder/${f.name}`, header: { first: f.first, last: f.last, levelBits: f.levelBits, pointTime: f.pointTime } as unknown as ImageHeader };
}

/** The real `qp` (src/chain/path.ts) of files among `files`. */
function qpIn(files: readonly PlanFile[]): (target: PlanFile) => PlanFile[] {
  const chain = files.map(asChainFile);
  const asChain = new Map(chain.map((c) => [c.name, c]));
  const byName = new Map(files.map((f) => [f.name, f]));
  return (target) => dependencyPath(asChain.get(target.name)!, chain).map((c) => byName.get(c.name)!);
}

function qp(files: readonly PlanFile[], target: PlanFile): PlanFile[] {
  return qpIn(files)(target);
}

/** Names of files whose path is broken among `files` (a quick equivalent of dependencyPath, for many intermediate states). */
function unrestorable(files: Iterable<PlanFile>): string[] {
  const best = new Map<number, PlanFile>();
  const list = [...files];
  for (const f of list) {
    const b = best.get(f.last);
    if (!b || f.first < b.first || (f.first === b.first && levelRank(f.levelBits) > levelRank(b.levelBits))) best.set(f.last, f);
  }
  const ok = new Map<number, boolean>([[0, best.has(0)]]);
  const restores = (point: number): boolean => {
    const known = ok.get(point);
    if (known !== undefined) return known;
    const b = best.get(point);
    const r = !!b && restores(b.first - 1);
    ok.set(point, r);
    return r;
  };
  return list.filter((f) => (f.last === 0 ? false : !restores(f.first - 1))).map((f) => f.name);
}

function newestOf(files: readonly PlanFile[]): PlanFile {
  let best: PlanFile | undefined;
  for (const f of files) {
    if (!best || f.last > best.last || (f.last === best.last && (f.first < best.first || (f.first === best.first && levelRank(f.levelBits) > levelRank(best.levelBits))))) best = f;
  }
  return best!;
}

/** A backup folder holding one chain, in memory. */
class Folder {
  files: PlanFile[];
  n = 0;
  constructor(baseAt: string, readonly zone = BERLIN) {
    this.files = [{ name: B, volume: 'C_VOL', base: 1, first: 0, last: 0, levelBits: 0, pointTime: this.at(baseAt) }];
  }

  at(local: string): number {
    return parseLocalTime(local, this.zone);
  }

  backupAt(ms: number): PlanFile {
    this.n++;
    const f: PlanFile = { name: i(this.n), volume: 'C_VOL', base: 1, first: this.n, last: this.n, levelBits: 0, pointTime: ms };
    this.files.push(f);
    return f;
  }

  backup(...local: string[]): this {
    for (const l of local) this.backupAt(this.at(l));
    return this;
  }

  /** Backups at the given local times of every day from..to. */
  daily(from: Day, to: Day, times: string[]): this {
    for (let d = from; d <= to; d = addDays(d, 1)) this.backup(...times.map((tm) => `${d}T${tm}`));
    return this;
  }

  night(local: string, o: Partial<PolicySettings> = {}): Plan {
    const plan = planNight(this.files, settings(o, this.zone), this.at(local));
    this.files = applyPlan(this.files, plan);
    return plan;
  }

  /** Processing at 00:05 each night from..to, with backups at `times` during each day before. */
  live(from: Day, to: Day, times: string[], o: Partial<PolicySettings> = {}): Map<Day, Plan> {
    const plans = new Map<Day, Plan>();
    for (let d = from; d <= to; d = addDays(d, 1)) {
      plans.set(d, this.night(`${d}T00:05`, o));
      if (d < to) this.backup(...times.map((tm) => `${d}T${tm}`));
    }
    return plans;
  }

  has(name: string): boolean {
    return this.files.some((f) => f.name === name);
  }

  get(name: string): PlanFile {
    const f = this.files.find((x) => x.name === name);
    if (!f) throw new Error(`${name} is not in the folder`);
    return f;
  }

  qp(): string[] {
    return qp(this.files, newestOf(this.files)).map((f) => f.name);
  }
}

const collapses = (p: Plan): CollapseAction[] => p.actions.filter((a): a is CollapseAction => a.kind === 'collapse');
/** "name = source + source …" for each collapse. */
const built = (p: Plan): string[] => collapses(p).map((a) => `${a.name} = ${a.sources.join(' + ')}`);
const removed = (p: Plan): string[] => p.actions.filter((a) => a.kind === 'remove').map((a) => a.name);
const reasonOf = (p: Plan, name: string): string => p.actions.find((a) => a.name === name && a.kind === 'remove')?.reason ?? '';

t.test('a past day becomes one -cd; today is never collapsed', async (t) => {
  const f = new Folder('2026-03-02T20:00').backup('2026-03-03T09:00', '2026-03-03T12:00', '2026-03-03T15:00', '2026-03-04T10:00');
  t.same(planNight(f.files, settings(), f.at('2026-03-03T23:59:59')).actions, [], 'nothing before the day is over');
  const plan = f.night('2026-03-04T12:00');
  t.equal(plan.today, '2026-03-04');
  t.same(built(plan), [`${i(3, '-cd')} = ${i(3)} + ${i(2)} + ${i(1)}`]);
  t.match(collapses(plan)[0], { level: 'daily', day: '2026-03-03', first: 1, last: 3, levelBits: cd, pointTime: f.at('2026-03-03T15:00'), reason: /^daily of Tue 2026-03-03: points i001\.\.i003 from 3 files$/ });
  t.same(removed(plan), [i(3)], 'the raw file ending where the daily ends goes at once; the others stay for their own points in time');
  t.match(reasonOf(plan, i(3)), /covered by C_VOL-b001-i003-cd\.spi, which ends at the same point and covers i001\.\.i003/);
  t.same(f.qp(), [i(4), i(3, '-cd'), B], 'today\'s incremental stays raw');
  t.same(qp(f.files, f.get(i(2))).map((x) => x.name), [i(2), i(1), B], 'a collapsed-away incremental still restores its own point');
  t.same(f.night('2026-03-04T12:00').actions, [], 'a second run the same night has nothing to do');
});

t.test('a day with a single incremental still gets a -cd', async (t) => {
  const f = new Folder('2026-03-02T20:00').backup('2026-03-03T09:00', '2026-03-03T12:00', '2026-03-04T10:00', '2026-03-05T10:00');
  f.night('2026-03-04T00:05');
  const plan = f.night('2026-03-06T00:05');
  t.same(built(plan), [`${i(3, '-cd')} = ${i(3)}`, `${i(4, '-cd')} = ${i(4)}`]);
  t.match(collapses(plan), [{ first: 3, last: 3 }, { first: 4, last: 4 }], 'the same range as the incremental');
  t.same(removed(plan), [i(4), i(3)], 'each raw file is covered by the -cd ending at its point');
  t.same(f.qp(), [i(4, '-cd'), i(3, '-cd'), i(2, '-cd'), B]);
});

t.test('missed nights are caught up in calendar order; a day without images gets no daily', async (t) => {
  // 2026-03-01 is a Sunday; nothing on Wednesday the 4th; no processing until Monday the 9th.
  const f = new Folder('2026-03-01T08:00');
  for (const d of ['2026-03-02', '2026-03-03', '2026-03-05', '2026-03-06', '2026-03-07', '2026-03-08']) f.backup(`${d}T09:00`, `${d}T13:00`, `${d}T17:00`);
  const plan = f.night('2026-03-09T00:05');
  t.same(built(plan), [
    `${i(3, '-cd')} = ${i(3)} + ${i(2)} + ${i(1)}`,
    `${i(6, '-cd')} = ${i(6)} + ${i(5)} + ${i(4)}`,
    `${i(9, '-cd')} = ${i(9)} + ${i(8)} + ${i(7)}`,
    `${i(12, '-cd')} = ${i(12)} + ${i(11)} + ${i(10)}`,
    `${i(15, '-cd')} = ${i(15)} + ${i(14)} + ${i(13)}`,
    `${i(15, '-cd-cw')} = ${i(15, '-cd')} + ${i(12, '-cd')} + ${i(9, '-cd')} + ${i(6, '-cd')} + ${i(3, '-cd')}`,
    `${i(18, '-cd')} = ${i(18)} + ${i(17)} + ${i(16)}`,
  ]);
  t.same(collapses(plan).map((a) => a.day), ['2026-03-02', '2026-03-03', '2026-03-05', '2026-03-06', '2026-03-07', '2026-03-07', '2026-03-08']);
  // Raw incrementals are kept 3 days back from Monday the 9th (from the 6th on).
  t.same(removed(plan), [i(18), i(15), i(15, '-cd'), i(12), i(9), i(8), i(7), i(6), i(5), i(4), i(3), i(2), i(1)]);
  t.match(reasonOf(plan, i(8)), /^raw incremental of 2026-03-05, older than the 3 days of raw incrementals kept \(from 2026-03-06\), and no kept file depends on it$/);
  t.same(f.qp(), [i(18, '-cd'), i(15, '-cd-cw'), B]);
  t.ok(f.has(i(3, '-cd')) && f.has(i(11)) && f.has(i(10)), 'dailies kept 14 days; raw files of the 6th kept');
});

t.test('a Saturday that ends a month: -cd, then -cd-cw, then -cd-cw-cm, each from the one before', async (t) => {
  // 2026-01-31 is a Saturday; backups at 10:00 and 18:00 Monday 26th to Saturday 31st.
  const f = new Folder('2026-01-25T08:00');
  const plans = f.live('2026-01-26', '2026-02-01', ['10:00', '18:00']);
  const plan = plans.get('2026-02-01')!;
  t.same(built(plan), [
    `${i(12, '-cd')} = ${i(12)} + ${i(11)}`,
    `${i(12, '-cd-cw')} = ${i(12, '-cd')} + ${i(10, '-cd')} + ${i(8, '-cd')} + ${i(6, '-cd')} + ${i(4, '-cd')} + ${i(2, '-cd')}`,
    `${i(12, '-cd-cw-cm')} = ${i(12, '-cd-cw')}`,
  ]);
  t.same(collapses(plan).map((a) => [a.level, a.first, a.last, a.levelBits]), [['daily', 11, 12, cd], ['weekly', 1, 12, cd | cw], ['monthly', 1, 12, cd | cw | cm]]);
  t.match(collapses(plan)[2]!.reason, /monthly of the month ending Sat 2026-01-31; -cw too: the end of week falls on the same day/);
  t.same(removed(plan), [i(12), i(12, '-cd'), i(12, '-cd-cw'), i(5)], 'the two files the monthly covers at the same point go at once');
  t.same(f.qp(), [i(12, '-cd-cw-cm'), B]);
});

t.test('end of month 31 in February is its last day; a leap year too', async (t) => {
  for (const [endOfMonth, day] of [[31, '2028-02-29'], [30, '2028-02-29'], [29, '2028-02-29'], [28, '2028-02-28'], [15, '2028-02-15']] as const) {
    const f = new Folder('2028-01-31T20:00');
    const plans = f.live('2028-02-01', '2028-03-02', ['12:00'], { endOfMonth });
    const monthlies = [...plans.values()].flatMap(collapses).filter((a) => a.level === 'monthly');
    t.same(monthlies.map((a) => a.day), [day], `end of month ${endOfMonth}: the monthly of February is for ${day}`);
    const n = Number(day.slice(8));
    t.same(monthlies.map((a) => [a.name, a.first, a.last]), [[i(n, '-cd-cm'), 1, n]], `named after ${day}'s point`);
    t.notOk(plans.get(day)!.actions.some((a) => a.kind === 'collapse' && a.level === 'monthly'), 'not before the day is over');
    if (endOfMonth > 29) t.match(monthlies[0]!.reason, /end of month \d+, clamped to the month's 29 days/);
  }
});

t.test('a week that straddles a month end', async (t) => {
  // April 2026: Saturdays 4, 11, 18, 25; Thursday the 30th ends the month; one backup a day, point n on April n.
  const f = new Folder('2026-04-01T08:00');
  const plans = f.live('2026-04-01', '2026-05-03', ['12:00']);
  t.same(built(plans.get('2026-05-01')!), [
    `${i(30, '-cd')} = ${i(30)}`,
    `${i(30, '-cd-cm')} = ${i(30, '-cd')} + ${i(29, '-cd')} + ${i(28, '-cd')} + ${i(27, '-cd')} + ${i(26, '-cd')} + ${i(25, '-cd-cw')} + ${i(18, '-cd-cw')} + ${i(11, '-cd-cw')} + ${i(4, '-cd-cw')}`,
  ], 'the monthly covers everything since the base, through the fewest files');
  t.same(built(plans.get('2026-05-03')!), [`${i(32, '-cd')} = ${i(32)}`, `${i(32, '-cd-cw')} = ${i(32, '-cd')} + ${i(31, '-cd')}`],
    'the weekly covers only the part of the week after the monthly');
  t.match(collapses(plans.get('2026-05-03')!)[1], { first: 31, last: 32 });
  t.same(f.qp(), [i(32, '-cd-cw'), i(30, '-cd-cm'), B]);
});

t.test('periods ending on days without images still collapse, named after their last point', async (t) => {
  // May 2026: backups on the 1st–7th and 11th–28th only (points 1–7 and 8–25). Saturdays 2, 9, 16, 23, 30; Sunday 31 ends the month.
  const f = new Folder('2026-05-01T08:00');
  const plans = new Map<Day, Plan>();
  for (let d = '2026-05-02'; d <= '2026-06-01'; d = addDays(d, 1)) {
    const prev = addDays(d, -1);
    if (prev <= '2026-05-07' || (prev >= '2026-05-11' && prev <= '2026-05-28')) f.backup(`${prev}T12:00`);
    plans.set(d, f.night(`${d}T00:05`));
  }
  const weekly9 = collapses(plans.get('2026-05-10')!);
  t.same(weekly9.map((a) => [a.name, a.first, a.last, a.day]), [[i(7, '-cd-cw'), 3, 7, '2026-05-09']], 'Saturday the 9th: named after Thursday the 7th');
  t.match(weekly9[0]!.reason, /no image on 2026-05-09: named after the last point before it, on 2026-05-07/);
  t.same(collapses(plans.get('2026-05-17')!).map((a) => [a.name, a.first, a.last]), [[i(13, '-cd'), 13, 13], [i(13, '-cd-cw'), 8, 13]]);
  t.same(built(plans.get('2026-05-31')!), [`${i(25, '-cd-cw')} = ${i(25, '-cd')} + ${i(24, '-cd')} + ${i(23, '-cd')} + ${i(22, '-cd')} + ${i(21, '-cd')}`]);
  t.same(built(plans.get('2026-06-01')!), [`${i(25, '-cd-cm')} = ${i(25, '-cd-cw')} + ${i(20, '-cd-cw')} + ${i(13, '-cd-cw')} + ${i(7, '-cd-cw')} + ${i(2, '-cd-cw')}`],
    'Sunday the 31st: the monthly, named after the 28th');
  t.ok(removed(plans.get('2026-06-01')!).includes(i(25, '-cd-cw')), 'the weekly at the same point goes at once');
  t.same([...plans.values()].flatMap(collapses).filter((a) => a.day >= '2026-05-29' && a.day <= '2026-05-31' && a.level === 'daily'), [], 'no daily for a day without images');
  t.same(f.qp(), [i(25, '-cd-cm'), B]);
});

t.test('days of 23 and 25 hours', async (t) => {
  const cases: [string, Day, number][] = [
    [BERLIN, '2026-03-29', 23], [BERLIN, '2026-10-25', 25], ['America/New_York', '2026-03-08', 23], ['America/New_York', '2026-11-01', 25],
  ];
  for (const [zone, day, hours] of cases) {
    t.equal(dayLengthHours(day, zone), hours);
    const f = new Folder(`${addDays(day, -2)}T12:00`, zone);
    // A backup at the half hour of every hour of the day before, the day itself and the day after.
    const counts: number[] = [];
    for (const d of [addDays(day, -1), day, addDays(day, 1)]) {
      const start = startOfDay(d, zone);
      const end = startOfDay(addDays(d, 1), zone);
      let n = 0;
      for (let ms = start + HOUR / 2; ms < end; ms += HOUR) {
        f.backupAt(ms);
        n++;
      }
      counts.push(n);
    }
    t.same(counts, [24, hours, 24]);
    const plan = planNight(f.files, settings({}, zone), f.at(`${addDays(day, 2)}T00:05`));
    const dailies = collapses(plan).filter((a) => a.level === 'daily');
    t.same(dailies.map((a) => [a.day, a.first, a.last]), [[addDays(day, -1), 1, 24], [day, 25, 24 + hours], [addDays(day, 1), 25 + hours, 48 + hours]],
      `${zone} ${day}: its daily holds exactly its ${hours} points`);
    t.same(dailies.map((a) => dayOf(a.pointTime, zone)), dailies.map((a) => a.day));
  }
});

t.test('rolling: after N monthlies the oldest is rolled into a -cr that replaces the old one', async (t) => {
  // 2026: Jan 31 and Feb 28 are Saturdays (-cd-cw-cm), Mar 31 a Tuesday, Apr 30 a Thursday; one backup a day, point n on day n of the year.
  const f = new Folder('2026-01-01T08:00');
  const plans = f.live('2026-01-01', '2026-05-01', ['12:00'], { rollingMonths: 2 });
  t.same(collapses(plans.get('2026-03-01')!).filter((a) => a.level === 'monthly' || a.level === 'rolling').map((a) => a.name), [i(59, '-cd-cw-cm')], 'two monthlies: no roll yet');
  const april = plans.get('2026-04-01')!;
  t.same(built(april).slice(-2), [
    `${i(90, '-cd-cm')} = ${i(90, '-cd')} + ${i(89, '-cd')} + ${i(88, '-cd')} + ${i(87, '-cd-cw')} + ${i(80, '-cd-cw')} + ${i(73, '-cd-cw')} + ${i(66, '-cd-cw')}`,
    `${i(31, '-cd-cw-cm-cr')} = ${i(31, '-cd-cw-cm')}`,
  ]);
  t.match(collapses(april).at(-1), { level: 'rolling', first: 1, last: 31, levelBits: cd | cw | cm | cr, reason: /3 monthlies after the rolling file, 2 kept; C_VOL-b001-i031-cd-cw-cm\.spi rolled into a new rolling file: points i001\.\.i031 from 1 file$/ });
  t.ok(removed(april).includes(i(31, '-cd-cw-cm')), 'the rolled monthly goes');
  const may = plans.get('2026-05-01')!;
  t.same(built(may).slice(-1), [`${i(59, '-cd-cw-cm-cr')} = ${i(59, '-cd-cw-cm')} + ${i(31, '-cd-cw-cm-cr')}`]);
  const order = may.actions.map((a) => `${a.kind} ${a.name}`);
  const rollAt = order.indexOf(`collapse ${i(59, '-cd-cw-cm-cr')}`);
  t.ok(rollAt >= 0 && rollAt < order.indexOf(`remove ${i(31, '-cd-cw-cm-cr')}`) && rollAt < order.indexOf(`remove ${i(59, '-cd-cw-cm')}`), 'removals after the collapse they depend on');
  t.match(reasonOf(may, i(31, '-cd-cw-cm-cr')), /^rolling file replaced by C_VOL-b001-i059-cd-cw-cm-cr\.spi/);
  t.same(f.qp(), [i(120, '-cd-cm'), i(90, '-cd-cm'), i(59, '-cd-cw-cm-cr'), B]);
  t.same(f.files.filter((x) => x.levelBits & cr).map((x) => x.name), [i(59, '-cd-cw-cm-cr')], 'one rolling file');

  // Turning rolling on late rolls every monthly beyond N at once.
  const g = new Folder('2026-01-01T08:00');
  g.live('2026-01-01', '2026-05-01', ['12:00']);
  const lateDefault = planNight(g.files, settings({ rollingMonths: 1 }), g.at('2026-05-01T12:00'));
  t.same(built(lateDefault), [`${i(90, '-cd-cm-cr')} = ${i(90, '-cd-cm')} + ${i(59, '-cd-cw-cm')} + ${i(31, '-cd-cw-cm')}`]);
  t.same(removed(lateDefault), [i(90, '-cd-cm')], "March's weeklies, kept 8 weeks, still need February's and January's monthlies");
  const late = g.night('2026-05-01T12:00', { rollingMonths: 1, keepWeeklyWeeks: 2 });
  t.same(removed(late).filter((x) => x.includes('-cm')), [i(90, '-cd-cm'), i(59, '-cd-cw-cm'), i(31, '-cd-cw-cm')], 'with 2 weeks of weeklies nothing needs them');
  t.match(reasonOf(late, i(59, '-cd-cw-cm')), /^monthly rolled into C_VOL-b001-i090-cd-cm-cr\.spi/);
  t.same(g.qp(), [i(120, '-cd-cm'), i(90, '-cd-cm-cr'), B]);
});

t.test('retention keeps what it is told to, and whatever a kept file needs', async (t) => {
  // Backups at 00:00, 06:00, 12:00 and 18:00 from Thursday 2026-01-01 to Wednesday 2026-02-18, processing each night at 00:05.
  const f = new Folder('2025-12-31T20:00');
  const o = { keepIncrementalDays: 2, keepDailyDays: 5, keepWeeklyWeeks: 2 };
  for (let d = '2026-01-01'; d <= '2026-02-18'; d = addDays(d, 1)) {
    f.backup(`${d}T00:00`);
    f.night(`${d}T00:05`, o);
    f.backup(`${d}T06:00`, `${d}T12:00`, `${d}T18:00`);
  }
  f.backup('2026-02-19T00:00');
  f.night('2026-02-19T00:05', o);
  const days = (pred: (x: PlanFile) => boolean): string[] => [...new Set(f.files.filter(pred).map((x) => dayOf(x.pointTime, BERLIN)))].sort();
  t.same(days((x) => x.last > 0 && x.levelBits === 0), ['2026-02-17', '2026-02-18', '2026-02-19'], 'raw incrementals of today and 2 days back');
  t.equal(f.files.filter((x) => x.last > 0 && x.levelBits === 0).length, 3 + 3 + 1, 'each past day without its last, covered by its daily');
  // Dailies from the 14th on are kept; the 15th–18th (after Saturday the 14th's weekly) are also the newest point's path.
  t.same(days((x) => x.levelBits === cd), ['2026-02-15', '2026-02-16', '2026-02-17', '2026-02-18']);
  t.notOk(f.has(i(4 * 45, '-cd')), 'the daily of the 14th is covered by its weekly');
  // Weeklies from Feb 5 on: the 7th and 14th; the one of the 7th needs nothing older than January's monthly.
  t.same(days((x) => x.levelBits === (cd | cw)), ['2026-02-07', '2026-02-14']);
  t.same(days((x) => levelRank(x.levelBits) === 3), ['2026-01-31'], 'monthlies are kept');
  t.same(f.qp().map((n) => n.replace(/^C_VOL-b001-?/, '')), ['i197.spi', 'i196-cd.spi', 'i192-cd.spi', 'i188-cd.spi', 'i184-cd.spi', 'i180-cd-cw.spi', 'i152-cd-cw.spi', 'i124-cd-cw-cm.spi', '.spf']);

  // Dailies of a week protect each other back to the weekly: keep 1 day of dailies on a Friday.
  const g = new Folder('2026-02-28T20:00').daily('2026-03-01', '2026-03-05', ['12:00']);
  const plan = g.night('2026-03-06T00:05', { keepDailyDays: 1 });
  t.same(removed(plan).filter((n) => n.endsWith('-cd.spi')), [], 'older dailies are on the path of the kept daily of Thursday');
  t.same(g.qp(), [i(5, '-cd'), i(4, '-cd'), i(3, '-cd'), i(2, '-cd'), i(1, '-cd'), B]);
  t.same(removed(g.night('2026-03-06T00:06', { keepDailyDays: 0 })), [], 'nothing when all of them are the newest point\'s path');
});

t.test('consolidate:false and retain:false', async (t) => {
  const make = (): Folder => new Folder('2026-03-01T08:00').daily('2026-03-02', '2026-03-12', ['09:00', '17:00']);
  const noCollapse = make().night('2026-03-13T00:05', { consolidate: false });
  t.same(noCollapse.actions, [], 'no collapse, and every raw file is on the newest point\'s path');
  const f = make();
  f.files.push({ ...f.get(i(4)), name: i(4, '-cd'), first: 3, levelBits: cd });
  t.same(f.night('2026-03-13T00:05', { consolidate: false }).actions.map((a) => `${a.kind} ${a.name}`), [`remove ${i(4)}`, `remove ${i(3)}`],
    'retention alone still removes a covered file, and an incremental older than 3 days that nothing needs any more');
  const noRetain = make().night('2026-03-13T00:05', { retain: false, rollingMonths: 1 });
  t.equal(removed(noRetain).length, 0, 'no removal');
  t.equal(collapses(noRetain).filter((a) => a.level === 'daily').length, 11);
  t.equal(collapses(noRetain).filter((a) => a.level === 'rolling').length, 0, 'rolling is retention: off with it');
  t.same(make().night('2026-03-13T00:05', { retain: false, consolidate: false }).actions, []);
  const moved = make().night('2026-03-13T00:05', { removal: 'move' });
  t.ok(moved.actions.filter((a) => a.kind === 'remove').every((a) => a.kind === 'remove' && a.removal === 'move'));
});

t.test('bad input is refused with a clear error', async (t) => {
  const f = new Folder('2026-03-01T08:00').daily('2026-03-02', '2026-03-04', ['09:00', '17:00']);
  const now = f.at('2026-03-05T00:05');
  t.throws(() => planNight(f.files.filter((x) => x.name !== i(3)), settings(), now), { code: 'CHAIN_BROKEN', message: /ends at incremental 3/ });
  t.throws(() => planNight(f.files.filter((x) => x.name !== B), settings(), now), { code: 'CHAIN_BROKEN', message: /has no base C_VOL-b001\.spf/ });
  const other = { ...f.get(i(2)), name: 'D_VOL-b001-i002.spi', volume: 'D_VOL' };
  t.throws(() => planNight([...f.files, other], settings(), now), { code: 'PLAN_INPUT', message: /one chain at a time/ });
  t.throws(() => planNight([...f.files, { ...f.get(i(2)), name: i(2, '-cd') }], settings(), now), { code: 'PLAN_INPUT', message: /does not match/ });
  t.throws(() => planNight([...f.files, f.get(i(2))], settings(), now), { code: 'PLAN_INPUT', message: /listed twice/ });
  const swapped = f.files.map((x) => (x.name === i(3) ? { ...x, pointTime: f.get(i(1)).pointTime - 1 } : x));
  t.throws(() => planNight(swapped, settings(), now), { code: 'POINT_ORDER' });
  t.throws(() => planNight(f.files, settings({ timeZone: 'Europe/Atlantis' }), now), { code: 'USAGE', message: /not an IANA time zone/ });
  t.same(planNight([], settings(), now).actions, []);
  t.same(planNight([f.get(B)], settings(), now).actions, [], 'a base alone');
});

// ---------------------------------------------------------------------------------------
// Months of nights, checked after every one.

interface SimConfig {
  label: string;
  zone: string;
  start: Day;
  days: number;
  o: Partial<PolicySettings>;
  seed: number;
  /** chance that a given hour has a backup; 1 = every hour on the hour */
  hourly: number;
  /** chance that a day has no image at all, and that a night's processing does not run */
  emptyDay: number;
  missedNight: number;
  /** processing at 00:05 (else at a random time of the day) */
  atMidnight: boolean;
}

const RANK_BASE = 9;
const rankOf = (f: PlanFile): number => (f.last === 0 ? RANK_BASE : levelRank(f.levelBits));

function isEndOfWeek(s: PolicySettings, d: Day): boolean {
  return weekdayOf(d) === s.endOfWeek;
}
function isEndOfMonth(s: PolicySettings, d: Day): boolean {
  return endOfMonthIn(d, s.endOfMonth) === d;
}

/** The level of the newest point's path file covering each point 1..newest. */
function coverage(files: readonly PlanFile[]): number[] {
  const out: number[] = [];
  for (const f of qp(files, newestOf(files))) for (let p = f.first; p <= f.last; p++) if (p > 0) out[p] = rankOf(f);
  return out;
}

function simulate(t: Test, c: SimConfig): void {
  const s = settings(c.o, c.zone);
  const rnd = new Prng(c.seed);
  let files: PlanFile[] = [];
  let n = 0;
  const pointDay = new Map<number, Day>();
  let lastTime = -Infinity;
  const add = (ms: number): void => {
    if (ms <= lastTime) return;
    lastTime = ms;
    const f: PlanFile = n === 0
      ? { name: B, volume: 'C_VOL', base: 1, first: 0, last: 0, levelBits: 0, pointTime: ms }
      : { name: i(n), volume: 'C_VOL', base: 1, first: n, last: n, levelBits: 0, pointTime: ms };
    pointDay.set(n, dayOf(ms, c.zone));
    files.push(f);
    n++;
  };
  const failures: string[] = [];
  const fail = (msg: string): void => {
    if (failures.length < 20) failures.push(msg);
  };
  const lastPointUpTo = (d: Day): number => {
    let p = n - 1;
    while (p > 0 && pointDay.get(p)! > d) p--;
    return p;
  };
  const lastPointOn = (d: Day): number => {
    const p = lastPointUpTo(d);
    return pointDay.get(p) === d ? p : -1;
  };
  const endAtLeast = (fs: Iterable<PlanFile>, rank: number): number => {
    let end = 0;
    for (const f of fs) if (f.last > 0 && levelRank(f.levelBits) >= rank) end = Math.max(end, f.last);
    return end;
  };
  let prevCoverage: number[] | undefined;
  let nights = 0;
  let collapsesDone = 0;
  let removalsDone = 0;
  add(startOfDay(c.start, c.zone) + HOUR / 2);
  for (let k = 1; k <= c.days; k++) {
    const today = addDays(c.start, k);
    const dayStart = startOfDay(today, c.zone);
    const dayEnd = startOfDay(addDays(today, 1), c.zone);
    const nowMs = c.atMidnight ? dayStart + 5 * 60_000 : rnd.int(dayStart, dayEnd);
    // Today's backups: those before the processing time, the night's processing, then the rest.
    const backups: number[] = [];
    if (!rnd.chance(c.emptyDay)) {
      for (let ms = dayStart; ms < dayEnd; ms += HOUR) if (rnd.chance(c.hourly)) backups.push(ms + (c.hourly < 1 ? rnd.int(0, HOUR) : 0));
    }
    for (const ms of backups) if (ms < nowMs) add(ms);
    const rest = (): void => {
      for (const ms of backups) if (ms >= nowMs) add(ms);
    };
    if (rnd.chance(c.missedNight)) {
      rest();
      continue;
    }
    const at = `${c.label} night ${today} (now ${new Date(nowMs).toISOString()})`;
    const planInput = files;
    const plan = planNight(files, s, nowMs);
    nights++;
    if (plan.today !== today) fail(`${at}: today is ${plan.today}`);

    // Apply step by step, checking every collapse against the files as they are at that moment.
    const set = new Map(files.map((f) => [f.name, f]));
    let afterCollapses: PlanFile[] | undefined;
    const removedNow: PlanFile[] = [];
    for (const a of plan.actions) {
      if (a.kind === 'collapse') {
        collapsesDone++;
        if (afterCollapses) fail(`${at}: collapse ${a.name} after a removal`);
        const src = a.sources.map((x) => set.get(x));
        if (src.some((x) => !x)) { fail(`${at}: ${a.name} reads a missing file`); continue; }
        const ok = src[0]!.last === a.last && src.at(-1)!.first === a.first && src.every((x, j) => j === 0 || x!.last === src[j - 1]!.first - 1);
        if (!ok) fail(`${at}: ${a.name} ${a.first}..${a.last} is not exactly covered by ${a.sources.join(', ')}`);
        const realPath = qpIn([...set.values()])(src[0]!).slice(0, src.length).map((x) => x.name);
        if (realPath.join() !== a.sources.join()) fail(`${at}: ${a.name} reads ${a.sources.join(', ')}, not the dependency path ${realPath.join(', ')}`);
        if (a.name !== formatImageName({ volume: 'C_VOL', base: 1, last: a.last, levelBits: a.levelBits })) fail(`${at}: ${a.name} misnamed`);
        if (a.pointTime !== src[0]!.pointTime) fail(`${at}: ${a.name} has the wrong point time`);
        if (!(pointDay.get(a.last)! <= a.day && a.day < today)) fail(`${at}: ${a.name} collapses a point of ${pointDay.get(a.last)} for day ${a.day}`);
        if (set.has(a.name)) fail(`${at}: ${a.name} exists already`);
        const expectBits = { daily: cd, weekly: cd | cw, monthly: isEndOfWeek(s, a.day) ? cd | cw | cm : cd | cm, rolling: a.levelBits | cr }[a.level];
        if (a.levelBits !== expectBits) fail(`${at}: ${a.name} has level bits ${a.levelBits} for a ${a.level}`);
        if ((a.level === 'weekly' && !isEndOfWeek(s, a.day)) || (a.level === 'monthly' && !isEndOfMonth(s, a.day))) fail(`${at}: ${a.level} ${a.name} on ${a.day}`);
        // From the end of the newest file of its level or higher, to the last point of its day or period.
        const rank = levelRank(a.levelBits);
        const from = a.level === 'rolling' ? 1 : endAtLeast(set.values(), rank) + 1;
        const to = a.level === 'daily' ? lastPointOn(a.day) : a.level === 'rolling' ? a.last : lastPointUpTo(a.day);
        if (a.first !== from || a.last !== to) fail(`${at}: ${a.level} ${a.name} covers ${a.first}..${a.last}, not ${from}..${to}`);
        set.set(a.name, { name: a.name, volume: 'C_VOL', base: 1, first: a.first, last: a.last, levelBits: a.levelBits, pointTime: a.pointTime });
      } else {
        afterCollapses ??= [...set.values()];
        removalsDone++;
        const f = set.get(a.name);
        if (!f) { fail(`${at}: removes missing ${a.name}`); continue; }
        if (f.last === 0) fail(`${at}: removes the base`);
        removedNow.push(f);
        set.delete(a.name);
        // Killed right after this removal, every remaining file must still restore.
        for (const r of unrestorable(set.values())) fail(`${at}: after removing ${a.name}, ${r} no longer restores`);
      }
    }
    afterCollapses ??= [...set.values()];
    files = [...set.values()];
    // Caught up: every past day is in a daily, every past week end in a weekly, every past month end in a monthly.
    if (s.consolidate) {
      const yesterday = addDays(today, -1);
      let eow = yesterday;
      while (!isEndOfWeek(s, eow)) eow = addDays(eow, -1);
      let eom = yesterday;
      while (!isEndOfMonth(s, eom)) eom = addDays(eom, -1);
      for (const [rank, upTo] of [[1, lastPointUpTo(yesterday)], [2, lastPointUpTo(eow)], [3, lastPointUpTo(eom)]] as const) {
        if (endAtLeast(set.values(), rank) < upTo) fail(`${at}: level ${rank} ends at ${endAtLeast(set.values(), rank)}, not caught up to ${upTo}`);
      }
    }
    const viaApply = applyPlan(planInput, plan).map((f) => f.name).sort();
    if (viaApply.join() !== files.map((f) => f.name).sort().join()) fail(`${at}: applyPlan disagrees with the step-by-step application`);

    // Nothing on the path of a remaining file was removed; every remaining file restores.
    const removedNames = new Set(removedNow.map((f) => f.name));
    const qpBefore = qpIn(afterCollapses);
    const qpNow = qpIn(files);
    const onPath = new Set<string>();
    for (const f of files) {
      try {
        for (const p of qpBefore(f)) if (removedNames.has(p.name)) fail(`${at}: removed ${p.name} is on the path of ${f.name}`);
        for (const p of qpNow(f).slice(1)) onPath.add(p.name);
      } catch (e) {
        fail(`${at}: ${f.name} does not restore: ${(e as Error).message}`);
      }
    }
    // The newest point's file stays; its path climbs levels and never becomes finer than the night before.
    const newest = newestOf(files);
    if (newest.last !== n - 1) fail(`${at}: the newest point ${n - 1} lost its file`);
    const path = qpNow(newest);
    for (let j = 1; j < path.length; j++) if (rankOf(path[j]!) < rankOf(path[j - 1]!)) fail(`${at}: the newest path drops from ${path[j - 1]!.name} to ${path[j]!.name}`);
    const cov = coverage(files);
    if (prevCoverage) for (let p = 1; p < prevCoverage.length; p++) if ((cov[p] ?? -1) < prevCoverage[p]!) fail(`${at}: point ${p} is restored through a lower level than the night before`);
    prevCoverage = cov;

    // Retention as configured: every file that is left has a reason to be, every file of the keep windows is there.
    if (s.retain) {
      const keepFrom = [addDays(today, -s.keepIncrementalDays), addDays(today, -s.keepDailyDays), addDays(today, -7 * s.keepWeeklyWeeks)];
      const rollEnd = Math.max(0, ...files.filter((f) => f.levelBits & cr).map((f) => f.last));
      for (const f of files) {
        if (f.last === 0 || f === newest || onPath.has(f.name)) continue;
        const best = newestOf(files.filter((x) => x.last === f.last));
        const r = rankOf(f);
        const inWindow = r < 3 ? pointDay.get(f.last)! >= keepFrom[r]! : f.last >= rollEnd;
        if (best !== f || !inWindow) fail(`${at}: ${f.name} should have been removed`);
      }
      for (const f of removedNow) {
        const best = newestOf(afterCollapses.filter((x) => x.last === f.last));
        const r = rankOf(f);
        if (best === f && r < 3 && pointDay.get(f.last)! >= keepFrom[r]!) fail(`${at}: ${f.name} was removed inside its keep window`);
        if (best === f && r >= 3 && f.last >= rollEnd) fail(`${at}: monthly or rolling ${f.name} was removed`);
      }
      // Every point of the raw window still restores as itself.
      for (let p = 1; p < n; p++) {
        if (pointDay.get(p)! >= keepFrom[0]! && !files.some((f) => f.last === p)) fail(`${at}: point ${p} of ${pointDay.get(p)} can no longer be restored`);
      }
    }

    // The newest point's path: today's raw files, then what the calendar allows.
    if (s.consolidate) {
      const byRank = (r: number): PlanFile[] => path.filter((f) => f.last > 0 && rankOf(f) === r);
      let lastPeriod = addDays(today, -1);
      while (!isEndOfWeek(s, lastPeriod) && !isEndOfMonth(s, lastPeriod)) lastPeriod = addDays(lastPeriod, -1);
      let lastMonth = addDays(today, -1);
      while (!isEndOfMonth(s, lastMonth)) lastMonth = addDays(lastMonth, -1);
      for (const f of byRank(0)) if (pointDay.get(f.last) !== today) fail(`${at}: raw ${f.name} of ${pointDay.get(f.last)} on the newest path`);
      for (const f of byRank(1)) if (!(pointDay.get(f.last)! > lastPeriod)) fail(`${at}: daily ${f.name} older than the last period end ${lastPeriod}`);
      for (const f of byRank(2)) if (!(pointDay.get(f.last)! > lastMonth)) fail(`${at}: weekly ${f.name} older than the last month end ${lastMonth}`);
      if (byRank(1).length > 6 || byRank(2).length > 5) fail(`${at}: ${byRank(1).length} dailies and ${byRank(2).length} weeklies on the newest path`);
      if (s.rollingMonths > 0 && s.retain && (byRank(3).length > s.rollingMonths || byRank(4).length > 1)) fail(`${at}: ${byRank(3).length} monthlies, ${byRank(4).length} rolling files on the newest path`);
    }
    // Planning the same night again changes nothing.
    const again = planNight(files, s, nowMs);
    if (again.actions.length) fail(`${at}: a second run plans ${again.actions.map((a) => `${a.kind} ${a.name}`).join(', ')}`);

    rest();
  }
  t.same(failures, [], `${c.label}: ${nights} nights, ${n - 1} incrementals, ${collapsesDone} collapses, ${removalsDone} removals, ${files.length} files left`);
  t.ok(collapsesDone > 0 || !s.consolidate, `${c.label}: something was collapsed`);
}

t.test('120 days of hourly incrementals, checked after every night', async (t) => {
  const configs: SimConfig[] = [
    { label: 'Berlin, defaults, rolling 2', zone: BERLIN, start: '2026-01-01', days: 120, o: { rollingMonths: 2 }, seed: 1, hourly: 1, emptyDay: 0, missedNight: 0.05, atMidnight: true },
    { label: 'New York, week ends Sunday, month on the 30th', zone: 'America/New_York', start: '2026-08-20', days: 120,
      o: { endOfWeek: 0, endOfMonth: 30, keepIncrementalDays: 1, keepDailyDays: 10, keepWeeklyWeeks: 3 }, seed: 2, hourly: 0.6, emptyDay: 0.15, missedNight: 0.1, atMidnight: false },
    { label: 'Sydney, everything kept as briefly as possible, rolling 1', zone: 'Australia/Sydney', start: '2026-02-10', days: 120,
      o: { endOfWeek: 5, endOfMonth: 1, keepIncrementalDays: 0, keepDailyDays: 0, keepWeeklyWeeks: 0, rollingMonths: 1 }, seed: 3, hourly: 0.3, emptyDay: 0.25, missedNight: 0.2, atMidnight: false },
  ];
  for (const c of configs) simulate(t, c);
});
