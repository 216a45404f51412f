/**
 * `<volume>-<base>.bad.log`: the files of a chain that failed verification, one a line,
 * "NAME<TAB>reason". Written by verification; read by backup, which refuses to extend a
 * chain whose dependency path holds a listed file.
 */
import { readFile } from 'node:fs/promises';

/** Listed file names and their reasons; empty when there is no log. */
export async function readBadLog(path: string): Promise<Map<string, string>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw e;
  }
  const bad = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (!line.trim() || line.startsWith('#')) continue;
    const [name, ...reason] = line.split('\t');
    bad.set(name!.trim(), reason.join('\t').trim());
  }
  return bad;
}

export function formatBadLog(entries: Map<string, string>): string {
  return [...entries].map(([name, reason]) => `${name}\t${reason.replace(/[\t\n]/g, ' ')}\n`).join('');
}
