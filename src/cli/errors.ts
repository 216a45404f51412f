/**
 * The one place errors become exit codes: 1 for a failure, 2 for a usage error. Every
 * error is one line on stderr that says what is wrong and what to do.
 */
import { ImagekeepError, UsageError } from '../formats/errors.js';

export class InterruptedError extends ImagekeepError {
  constructor(message: string) {
    super('INTERRUPTED', message);
  }
}

export function describeError(e: unknown): { line: string; code: number } {
  if (e instanceof UsageError) return { line: e.message, code: 2 };
  if (e instanceof ImagekeepError) return { line: e.message, code: 1 };
  const err = e as NodeJS.ErrnoException;
  switch (err?.code) {
    case 'ENOSPC':
      return { line: `no space left on the destination${err.path ? ` (${err.path})` : ''}: nothing was written under a final name; free space or choose another folder`, code: 1 };
    case 'EACCES':
    case 'EPERM':
      return { line: `permission denied: ${err.path ?? err.message}; run as a user who may read the source and write the folder`, code: 1 };
    case 'ENOENT':
      return { line: `no such file or directory: ${err.path ?? err.message}`, code: 1 };
    case 'EIO':
      return { line: `input/output error${err.path ? ` on ${err.path}` : ''}: the disk or file could not be read; check the device`, code: 1 };
    case 'EROFS':
      return { line: `read-only filesystem${err.path ? `: ${err.path}` : ''}; choose a writable destination`, code: 1 };
  }
  const msg = err instanceof Error ? err.message : String(e);
  return { line: `${msg.split('\n')[0]} (set IMAGEKEEP_DEBUG=1 for details)`, code: 1 };
}
