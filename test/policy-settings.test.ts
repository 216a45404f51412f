// Proves the folder processing settings: their defaults, the values accepted from a settings file or the command line, and a clear error naming the setting otherwise.
import t from 'tap';
import { POLICY_SETTINGS_DOC, defaultPolicySettings, policySettingsText, resolvePolicySettings } from '../src/chain/policy/settings.js';
import { machineTimeZone } from '../src/chain/policy/calendar.js';

t.test('defaults', async (t) => {
  t.same(defaultPolicySettings('Europe/Berlin'), {
    timeZone: 'Europe/Berlin', consolidate: true, retain: true, endOfWeek: 6, endOfMonth: 31, rollingMonths: 0,
    keepIncrementalDays: 3, keepDailyDays: 14, keepWeeklyWeeks: 8, removal: 'delete', verifyEveryDays: 7,
  });
  t.equal(defaultPolicySettings().timeZone, machineTimeZone(), "the machine's zone by default");
  t.equal(resolvePolicySettings({}).timeZone, machineTimeZone());
});

t.test('values from a settings file or the command line', async (t) => {
  const s = resolvePolicySettings({
    timeZone: 'America/New_York', consolidate: 'no', retain: false, endOfWeek: 'Sun', endOfMonth: '15', rollingMonths: 3,
    keepIncrementalDays: '0', keepDailyDays: 30, keepWeeklyWeeks: 12, removal: 'move', verifyEveryDays: '1', ignored: undefined,
  });
  t.same(s, {
    timeZone: 'America/New_York', consolidate: false, retain: false, endOfWeek: 0, endOfMonth: 15, rollingMonths: 3,
    keepIncrementalDays: 0, keepDailyDays: 30, keepWeeklyWeeks: 12, removal: 'move', verifyEveryDays: 1,
  });
  t.equal(resolvePolicySettings({ endOfWeek: 'FRIDAY' }).endOfWeek, 5);
  t.equal(resolvePolicySettings({ endOfWeek: 3 }).endOfWeek, 3);
  t.equal(resolvePolicySettings({ keepDailyDays: 5 }, resolvePolicySettings({ keepDailyDays: 9, retain: false })).retain, false, 'over a base');
});

t.test('bad values name the setting', async (t) => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ timeZone: 'Europe/Berlinn' }, /not an IANA time zone/],
    [{ timeZone: 7 }, /setting timeZone=7 is not an IANA time zone name/],
    [{ consolidate: 'maybe' }, /setting consolidate="maybe" is not true or false/],
    [{ endOfWeek: 'someday' }, /setting endOfWeek="someday" is not an integer from 0 to 6/],
    [{ endOfWeek: 7 }, /endOfWeek=7/],
    [{ endOfMonth: 0 }, /setting endOfMonth=0 is not an integer from 1 to 31/],
    [{ endOfMonth: 32 }, /endOfMonth=32/],
    [{ endOfMonth: 2.5 }, /endOfMonth=2.5/],
    [{ keepDailyDays: -1 }, /keepDailyDays=-1/],
    [{ keepIncrementalDays: '3 days' }, /keepIncrementalDays="3 days"/],
    [{ removal: 'shred' }, /setting removal="shred" is not delete or move/],
    [{ verifyEveryDays: 0 }, /verifyEveryDays=0 is not an integer from 1/],
    [{ keepWeekly: 3 }, /unknown setting "keepWeekly"; the settings are timeZone, consolidate/],
  ];
  for (const [input, message] of cases) t.throws(() => resolvePolicySettings(input), { code: 'USAGE', message }, JSON.stringify(input));
});

t.test('documentation covers every setting', async (t) => {
  t.same(POLICY_SETTINGS_DOC.map((d) => d.key).sort(), Object.keys(defaultPolicySettings('UTC')).sort());
  const text = policySettingsText();
  for (const d of POLICY_SETTINGS_DOC) t.match(text, new RegExp(`^${d.key} +`, 'm'), d.key);
});
