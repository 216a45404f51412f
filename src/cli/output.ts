/**
 * Small presentation helpers: sizes, times, tables, a progress bar that only draws on a TTY,
 * and reading the password from a file (never from argv).
 */
import { readFile } from 'node:fs/promises';
import cliProgress from 'cli-progress';
import { UsageError } from '../formats/errors.js';

export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let u = 0;
  let v = n;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ').trimEnd()).join('\n');
}

export function progressBar(label: string): { update: (done: number, total: number) => void; stop: () => void } {
  if (!process.stderr.isTTY) return { update: () => {}, stop: () => {} };
  const bar = new cliProgress.SingleBar({
    stream: process.stderr,
    format: `${label} [{bar}] {percentage}% | {doneH} of {totalH} | {speed}`,
    hideCursor: true,
    clearOnComplete: true,
  }, cliProgress.Presets.shades_classic);
  const started = Date.now();
  let begun = false;
  return {
    update(done, total) {
      const payload = { doneH: humanBytes(done), totalH: humanBytes(total), speed: `${humanBytes(done / Math.max(0.001, (Date.now() - started) / 1000))}/s` };
      if (!begun) { bar.start(total, done, payload); begun = true; } else bar.update(done, payload);
    },
    stop() { if (begun) bar.stop(); },
  };
}

/** --password-file, else IMAGEKEEP_PASSWORD_FILE; the file's first line is the password. */
export async function readPassword(file: string | undefined): Promise<Buffer | null> {
  const path = file ?? process.env.IMAGEKEEP_PASSWORD_FILE;
  if (!path) return null;
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new UsageError(`password file ${path} cannot be read`);
  }
  const pw = text.split('\n')[0]!.replace(/\r$/, '');
  if (!pw) throw new UsageError(`password file ${path} is empty`);
  return Buffer.from(pw, 'utf8');
}

export function parseSize(text: string, flag: string): number {
  const m = /^(\d+)\s*([KMG]i?B?|)$/i.exec(text.trim());
  if (!m) throw new UsageError(`${flag} "${text}" is not a size such as 65536 or 64K`);
  const mult: Record<string, number> = { '': 1, K: 1024, M: 2 ** 20, G: 2 ** 30 };
  return Number(m[1]) * mult[(m[2] ?? '').charAt(0).toUpperCase()]!;
}

export function warnLine(message: string): void {
  process.stderr.write(`imagekeep: warning: ${message}\n`);
}
