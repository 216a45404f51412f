/**
 * The fault-injection switch. Every write, fsync, rename and unlink that matters counts as
 * one durable step; with IMAGEKEEP_CRASH_AT=k the process kills itself (SIGKILL, so no
 * cleanup code runs) just before its k-th step. Crash tests run every k.
 * IMAGEKEEP_CRASH_TRACE=1 prints each step to stderr.
 */
import type { RandomAccessFile } from './types.js';

let stepCount = 0;
const crashAt = Number(process.env.IMAGEKEEP_CRASH_AT ?? 0);
const trace = process.env.IMAGEKEEP_CRASH_TRACE === '1';

export function durableStep(what: string): void {
  stepCount++;
  if (trace) process.stderr.write(`durable step ${stepCount}: ${what}\n`);
  if (crashAt > 0 && stepCount === crashAt) {
    process.kill(process.pid, 'SIGKILL');
  }
}

/**
 * A file whose every write and flush is a durable step: disk writers are handed one of these
 * so that a crash can be injected between any two of their writes.
 */
export class DurableFile implements RandomAccessFile {
  constructor(readonly inner: RandomAccessFile) {}

  get path(): string {
    return this.inner.path;
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  read(into: Uint8Array, at: number): Promise<void> {
    return this.inner.read(into, at);
  }

  write(from: Uint8Array, at: number): Promise<void> {
    durableStep(`write ${from.length} B at ${at} of ${this.inner.path}`);
    return this.inner.write(from, at);
  }

  truncate(size: number): Promise<void> {
    durableStep(`truncate ${this.inner.path} to ${size}`);
    return this.inner.truncate(size);
  }

  flush(): Promise<void> {
    durableStep(`fsync ${this.inner.path}`);
    return this.inner.flush();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
