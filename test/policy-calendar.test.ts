// Proves business days in IANA zones (SPEC §4): day boundaries on 23- and 25-hour DST days, skipped midnights, calendar arithmetic, --now/--at parsing and zone validation.
import t from 'tap';
import {
  addDays, checkTimeZone, dayLengthHours, dayOf, daysBetween, endOfMonthIn, formatLocalTime, isDay, isTimeZone,
  lastDayOfMonth, machineTimeZone, parseLocalTime, startOfDay, weekdayOf, weekdayName, zoneOffsetMs,
} from '../src/chain/policy/calendar.js';

const iso = (ms: number): string => new Date(ms).toISOString();

t.test('day of an instant follows the zone, not UTC', async (t) => {
  t.equal(dayOf(Date.parse('2026-03-28T23:30:00Z'), 'Europe/Berlin'), '2026-03-29');
  t.equal(dayOf(Date.parse('2026-03-28T23:30:00Z'), 'UTC'), '2026-03-28');
  t.equal(dayOf(Date.parse('2026-03-29T03:59:59Z'), 'America/New_York'), '2026-03-28');
  t.equal(dayOf(Date.parse('2026-03-29T04:00:00Z'), 'America/New_York'), '2026-03-29');
  t.equal(dayOf(Date.parse('2026-01-01T10:00:00Z'), 'Pacific/Kiritimati'), '2026-01-02', 'UTC+14');
});

t.test('23- and 25-hour days', async (t) => {
  const cases: [string, string, string, number][] = [
    ['Europe/Berlin', '2026-03-29', '2026-03-28T23:00:00.000Z', 23],
    ['Europe/Berlin', '2026-10-25', '2026-10-24T22:00:00.000Z', 25],
    ['Europe/Berlin', '2026-10-26', '2026-10-25T23:00:00.000Z', 24],
    ['America/New_York', '2026-03-08', '2026-03-08T05:00:00.000Z', 23],
    ['America/New_York', '2026-11-01', '2026-11-01T04:00:00.000Z', 25],
    ['UTC', '2026-03-29', '2026-03-29T00:00:00.000Z', 24],
    ['Australia/Lord_Howe', '2026-04-05', '2026-04-04T13:00:00.000Z', 24.5],
  ];
  for (const [zone, day, start, hours] of cases) {
    t.equal(iso(startOfDay(day, zone)), start, `${zone} ${day} starts at ${start}`);
    t.equal(dayLengthHours(day, zone), hours, `${zone} ${day} lasts ${hours} hours`);
  }
});

t.test('a day whose midnight is skipped starts at the transition', async (t) => {
  // Chile moves its clocks from 00:00 to 01:00 on the first Sunday of September.
  t.equal(iso(startOfDay('2026-09-06', 'America/Santiago')), '2026-09-06T04:00:00.000Z');
  t.equal(formatLocalTime(startOfDay('2026-09-06', 'America/Santiago'), 'America/Santiago'), '2026-09-06T01:00:00-03:00');
  t.equal(dayLengthHours('2026-09-06', 'America/Santiago'), 23);
  t.equal(dayOf(startOfDay('2026-09-06', 'America/Santiago') - 1, 'America/Santiago'), '2026-09-05');
});

t.test('every hour of a year lies inside its day, in several zones', async (t) => {
  for (const zone of ['Europe/Berlin', 'America/New_York', 'Australia/Lord_Howe', 'America/Santiago']) {
    const bad: string[] = [];
    for (let d = '2026-01-01'; d < '2027-01-01'; d = addDays(d, 1)) {
      const start = startOfDay(d, zone);
      const next = startOfDay(addDays(d, 1), zone);
      if (dayOf(start - 1, zone) !== addDays(d, -1)) bad.push(`${d}: the instant before its start is not the day before`);
      for (let ms = start + 17 * 60_000; ms < next; ms += 3_600_000) {
        if (dayOf(ms, zone) !== d) bad.push(`${d}: ${iso(ms)} is on ${dayOf(ms, zone)}`);
      }
    }
    t.same(bad.slice(0, 5), [], `${zone}: every hour inside its day`);
    t.equal((startOfDay('2027-01-01', zone) - startOfDay('2026-01-01', zone)) / 3_600_000, 8760, `${zone}: the days of 2026 add up to 8760 hours`);
  }
});

t.test('calendar arithmetic', async (t) => {
  t.equal(addDays('2026-02-28', 1), '2026-03-01');
  t.equal(addDays('2028-02-28', 1), '2028-02-29');
  t.equal(addDays('2026-01-01', -1), '2025-12-31');
  t.equal(addDays('2026-03-29', 1), '2026-03-30', 'day arithmetic ignores DST');
  t.equal(daysBetween('2026-01-01', '2026-12-31'), 364);
  t.equal(daysBetween('2026-03-30', '2026-03-28'), -2);
  t.equal(weekdayOf('2026-01-31'), 6, 'a Saturday');
  t.equal(weekdayOf('2026-03-01'), 0, 'a Sunday');
  t.equal(weekdayName('2026-02-28'), 'Sat');
  t.equal(lastDayOfMonth('2026-02-10'), '2026-02-28');
  t.equal(lastDayOfMonth('2028-02-10'), '2028-02-29');
  t.equal(lastDayOfMonth('2026-04-30'), '2026-04-30');
  t.equal(endOfMonthIn('2026-02-03', 31), '2026-02-28', 'clamped to February');
  t.equal(endOfMonthIn('2028-02-03', 30), '2028-02-29', 'clamped to a leap February');
  t.equal(endOfMonthIn('2026-04-03', 31), '2026-04-30');
  t.equal(endOfMonthIn('2026-04-03', 15), '2026-04-15');
  t.ok(isDay('2028-02-29'));
  t.notOk(isDay('2026-02-29'));
  t.notOk(isDay('2026-2-1'));
  t.throws(() => addDays('yesterday', 1), { code: 'USAGE' });
});

t.test('--now/--at parsing', async (t) => {
  const z = 'Europe/Berlin';
  t.equal(iso(parseLocalTime('2026-03-29T03:30', z)), '2026-03-29T01:30:00.000Z', 'summer time after the gap');
  t.equal(iso(parseLocalTime('2026-03-29T01:59:59', z)), '2026-03-29T00:59:59.000Z', 'winter time before the gap');
  t.equal(iso(parseLocalTime('2026-03-29 01:59:59.250', z)), '2026-03-29T00:59:59.250Z', 'a space and milliseconds');
  t.equal(iso(parseLocalTime('2026-03-29T02:30Z', z)), '2026-03-29T02:30:00.000Z', 'Z wins over the zone');
  t.equal(iso(parseLocalTime('2026-03-29T02:30+05:30', z)), '2026-03-28T21:00:00.000Z', 'an offset wins over the zone');
  t.equal(iso(parseLocalTime('2026-03-29T02:30-0800', z)), '2026-03-29T10:30:00.000Z');
  t.equal(iso(parseLocalTime('2026-03-29T02:30+01', z)), '2026-03-29T01:30:00.000Z');
  t.equal(iso(parseLocalTime('2026-03-29', z)), '2026-03-28T23:00:00.000Z', 'a date alone is the start of that day');
  t.equal(iso(parseLocalTime('2026-10-25T02:30', z)), '2026-10-25T00:30:00.000Z', 'a repeated hour: the first occurrence');
  t.equal(iso(parseLocalTime('2026-10-25T02:30+01:00', z)), '2026-10-25T01:30:00.000Z', 'the second occurrence by its offset');
  t.equal(iso(parseLocalTime('2026-11-01T01:30', 'America/New_York')), '2026-11-01T05:30:00.000Z');
  t.throws(() => parseLocalTime('2026-03-29T02:30', z, '--now'), { code: 'USAGE', message: /--now "2026-03-29T02:30" does not exist in Europe\/Berlin: the clocks skip 60 minutes/ });
  t.throws(() => parseLocalTime('2026-03-08T02:15', 'America/New_York'), { message: /does not exist/ });
  for (const bad of ['2026-02-29T10:00', '2026-13-01', '2026-01-01T24:00', '2026-01-01T10:60', 'now', '2026-01-01T10:00+25:00', '26-01-01T10:00']) {
    t.throws(() => parseLocalTime(bad, z, '--at'), { code: 'USAGE', message: /^--at "/ }, bad);
  }
  t.throws(() => parseLocalTime('2026-01-01T10:00', 'Nowhere/Atlantis'), { code: 'USAGE', message: /not an IANA time zone/ });
});

t.test('zones are validated', async (t) => {
  t.equal(checkTimeZone('Europe/Berlin'), 'Europe/Berlin');
  t.equal(checkTimeZone('utc'), 'UTC');
  t.throws(() => checkTimeZone('Mars/Olympus'), { code: 'USAGE', message: /"Mars\/Olympus" is not an IANA time zone name/ });
  t.throws(() => checkTimeZone(''), { code: 'USAGE' });
  t.notOk(isTimeZone('Europe/Berlinn'));
  t.ok(isTimeZone(machineTimeZone()));
  t.equal(zoneOffsetMs(Date.parse('2026-07-01T00:00:00Z'), 'Europe/Berlin'), 2 * 3_600_000);
  t.equal(zoneOffsetMs(Date.parse('2026-01-01T00:00:00Z'), 'Asia/Kolkata'), 5.5 * 3_600_000);
  t.equal(formatLocalTime(Date.parse('2026-01-01T00:00:00Z'), 'America/New_York'), '2025-12-31T19:00:00-05:00');
});
