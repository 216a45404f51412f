/**
 * Running the real tools (sfdisk, mkfs, mtools, debugfs...) with argument arrays, never a
 * shell string, and the devkit's errors. A failed tool becomes a `ToolFailedError` that
 * carries the command line, the exit status and the tail of its stderr, because "mkntfs
 * failed" alone sends the reader to reproduce it by hand.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { ImagekeepError } from '../formats/errors.js';

const execFileP = promisify(execFile);

/** The devkit's errors share the project's base class: a `code`, the numbers, a message. */
export class DevkitError extends ImagekeepError {}

/** A tool exited non-zero, was killed, or could not be started. */
export class ToolFailedError extends DevkitError {
  constructor(message: string, details: { command: string; args: string[]; exitCode: number | string | null; stderr: string }) {
    super('TOOL_FAILED', message, details);
  }
}

/** A request the caller can fix: bad sizes, a partition that has no such filesystem... */
export class DevkitUsageError extends DevkitError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('DEVKIT_USAGE', message, details);
  }
}

export interface RunOptions {
  /** Written to the tool's stdin, which is then closed. */
  input?: string;
  env?: Record<string, string>;
  /** Exit codes that are not failures (besides 0). */
  okCodes?: number[];
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export async function run(command: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const env = opts.env ? { ...process.env, ...opts.env } : process.env;
  const pending = execFileP(command, args, { env, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' });
  if (opts.input !== undefined) pending.child.stdin?.end(opts.input);
  else pending.child.stdin?.end();
  try {
    const { stdout, stderr } = await pending;
    return { code: 0, stdout, stderr };
  } catch (err) {
    // execFile's rejection: `code` is the exit status (number) or a spawn errno name (string).
    const e = err as { code?: number | string; signal?: string | null; stdout?: string; stderr?: string; message?: string };
    const stdout = e.stdout ?? '';
    const stderr = e.stderr ?? '';
    if (typeof e.code === 'number' && opts.okCodes?.includes(e.code)) return { code: e.code, stdout, stderr };
    const status = e.code ?? e.signal ?? null;
    throw new ToolFailedError(
      `${command} ${args.join(' ')} failed (${typeof status === 'number' ? `exit ${status}` : String(status)}): ${tail(stderr || stdout || e.message || '')}`,
      { command, args, exitCode: status, stderr },
    );
  }
}

/** The last few lines of a tool's output, for error messages. */
export function tail(text: string, lines = 6): string {
  return text.trim().split('\n').slice(-lines).join(' | ');
}
