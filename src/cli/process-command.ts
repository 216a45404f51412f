/**
 * `imagekeep process`: verify, consolidate and retain one or more folders (SPEC §7).
 */
import type { Command } from 'commander';
import { loadProcessConfig } from '../chain/config.js';
import { KeyRing } from '../chain/image/reader.js';
import { parseLocalTime } from '../chain/policy/calendar.js';
import { policySettingsText } from '../chain/policy/settings.js';
import { processFolder, type ProcessReport } from '../chain/process.js';
import { readPassword } from './output.js';

export function addProcessCommand(program: Command): void {
  program.command('process')
    .summary('verify, collapse (daily/weekly/monthly/rolling) and retain backup folders')
    .description('The daily processing of backup folders: verify new and due images, collapse previous business days ' +
      'into -cd, -cd-cw, -cd-cm (and -cr) files, and remove what retention no longer needs (never a file another kept ' +
      'file depends on, never a base). Run it shortly after midnight (e.g. 00:05). Settings come from the defaults, ' +
      '--config FILE, the folder\'s own imagekeep.json ({"settings": {...}}) and these flags, in that order.\n\n' +
      policySettingsText())
    .argument('[folders...]', 'folders to process (default: every folder of --config)')
    .option('--now <time>', 'the time to act as if it were now (ISO-8601; without an offset, in the folder\'s time zone)')
    .option('--dry-run', 'print what would be collapsed and removed; change nothing')
    .option('--config <file>', 'JSON config: {"concurrency": N, "defaults": {...}, "folders": [{"path", "priority", "settings"}]}')
    .option('--time-zone <zone>', 'IANA time zone of the business days')
    .option('--no-consolidate', 'do not collapse')
    .option('--no-retain', 'do not remove anything')
    .option('--end-of-week <day>', 'weekday that ends a week (default saturday)')
    .option('--end-of-month <n>', 'day of the month that ends a month, clamped (default 31)')
    .option('--rolling-months <n>', 'monthlies to keep before rolling into -cr (0: no rolling)')
    .option('--keep-incremental-days <n>', 'days of raw incrementals to keep')
    .option('--keep-daily-days <n>', 'days of dailies to keep')
    .option('--keep-weekly-weeks <n>', 'weeks of weeklies to keep')
    .option('--removal <mode>', 'delete, or move into Incrementals/')
    .option('--verify-every-days <n>', 're-verify every image this often')
    .option('--password-file <file>', 'password of encrypted chains (or IMAGEKEEP_PASSWORD_FILE)')
    .option('--json', 'print the reports as JSON')
    .action(async (folders: string[], o) => {
      const flags: Record<string, unknown> = {
        timeZone: o.timeZone, endOfWeek: o.endOfWeek, endOfMonth: o.endOfMonth, rollingMonths: o.rollingMonths,
        keepIncrementalDays: o.keepIncrementalDays, keepDailyDays: o.keepDailyDays, keepWeeklyWeeks: o.keepWeeklyWeeks,
        removal: o.removal, verifyEveryDays: o.verifyEveryDays,
        // commander sets these to true by default; only an explicit --no-… changes the folder's setting
        consolidate: o.consolidate === false ? false : undefined,
        retain: o.retain === false ? false : undefined,
      };
      const config = await loadProcessConfig(folders, o.config, flags);
      const keyring = new KeyRing(await readPassword(o.passwordFile));
      const reports: (ProcessReport | FolderFailure)[] = [];
      const queue = [...config.folders];
      // One folder's failure (locked by a backup, unreadable) is reported and the others still run.
      const worker = async () => {
        for (let f = queue.shift(); f; f = queue.shift()) {
          const prefix = config.folders.length > 1 ? `${f.path}: ` : '';
          try {
            const now = o.now ? parseLocalTime(o.now, f.settings.timeZone, '--now') : Date.now();
            reports.push(await processFolder(f.path, f.settings, {
              now, dryRun: !!o.dryRun, keyring, onLog: o.json ? undefined : (line) => console.log(prefix + line),
            }));
          } catch (e) {
            if (config.folders.length === 1) throw e;
            reports.push({ folder: f.path, ok: false, error: (e as Error).message });
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(config.concurrency, config.folders.length) }, worker));
      if (o.json) console.log(JSON.stringify(reports.length === 1 ? reports[0] : reports, null, 2));
      for (const r of reports) for (const line of failureLines(r)) process.stderr.write(`imagekeep: ${line}\n`);
      if (reports.some((r) => !r.ok)) process.exitCode = 1;
    });
}

interface FolderFailure {
  folder: string;
  ok: false;
  error: string;
}

/** What went wrong in a folder, a line each (the log lines above say it in full). */
function failureLines(r: ProcessReport | FolderFailure): string[] {
  if ('error' in r) return [r.error.includes(r.folder) ? r.error : `${r.folder}: ${r.error}`];
  const lines = (r.verified?.checked ?? []).filter((c) => !c.ok).map((c) => `${r.folder}: ${c.name} failed verification: ${c.reason}`);
  for (const a of r.actions) if (a.error) lines.push(`${r.folder}: ${a.kind === 'collapse' ? `collapse into ${a.name}` : `removal of ${a.name}`} failed: ${a.error}`);
  return lines;
}
