/**
 * The folder's verification state: per image file, when it was last verified (quick and
 * deep) and with what result, keyed by name, size and mtime so a replaced file counts as
 * never verified. One small JSON file, always written whole via a temporary name.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from './durable.js';

export const STATE_FILE = '.imagekeep-state.json';

export interface CheckRecord {
  at: number;
  ok: boolean;
  reason?: string;
}

export interface FileState {
  size: number;
  mtimeMs: number;
  quick?: CheckRecord;
  deep?: CheckRecord;
}

export interface FolderState {
  version: 1;
  files: Record<string, FileState>;
}

export async function loadState(dir: string): Promise<FolderState> {
  try {
    const doc = JSON.parse(await readFile(join(dir, STATE_FILE), 'utf8')) as FolderState;
    if (doc.version === 1 && doc.files && typeof doc.files === 'object') return doc;
  } catch {
    // Missing or unreadable: every file counts as never verified, which is safe.
  }
  return { version: 1, files: {} };
}

export async function saveState(dir: string, state: FolderState): Promise<void> {
  await writeFileAtomic(join(dir, STATE_FILE), Buffer.from(JSON.stringify(state, null, 1) + '\n'));
}

/** The state of a file if it still describes the same bytes (size and mtime unchanged). */
export function currentState(state: FolderState, name: string, size: number, mtimeMs: number): FileState | null {
  const s = state.files[name];
  return s && s.size === size && s.mtimeMs === mtimeMs ? s : null;
}
