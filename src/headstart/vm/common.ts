/**
 * What the three hypervisors share: the names of the files kept beside the disk, the checks
 * on VM settings every one of them needs, and the waiting of a test boot.
 *
 * Files beside a disk `dir/web.vmdk` are named from its stem: `dir/web.vmx` (the definition),
 * `dir/web.testboot.*` (a test boot's overlay, serial file, screenshot). The stem comes from
 * the disk's file name, which is already safe on the host; the VM name need not be.
 */
import { posix } from 'node:path';
import { UsageError } from '../../formats/errors.js';
import { HostCommandError, type ExecResult, type Host } from '../host.js';
import type { TestBootResult, VmSettings } from './types.js';

/** `dir/stem` + suffix, where stem is the disk's file name without its extension. */
export function besideDisk(diskPath: string, suffix: string): string {
  const dir = posix.dirname(diskPath);
  const base = posix.basename(diskPath);
  const dot = base.lastIndexOf('.');
  const stem = dot > 0 ? base.slice(0, dot) : base;
  return posix.join(dir, stem + suffix);
}

/**
 * The error `runChecked` would throw for a result already in hand: for commands whose
 * failure is sometimes an answer ("no such domain") and otherwise an error.
 */
export function commandFailed(host: Host, argv: string[], r: ExecResult): HostCommandError {
  const why = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-1)[0] || `exit ${r.code ?? r.signal}`;
  return new HostCommandError(`${host.label}: ${argv[0]} failed: ${why}`, { host: host.label, argv, code: r.code, stderr: r.stderr });
}

/** The name of the throwaway VM a test boot runs. */
export function testBootName(settings: VmSettings): string {
  return `${settings.name}-testboot`;
}

/** Checks every hypervisor needs; `label` names the hypervisor in messages. */
export function checkCommonSettings(settings: VmSettings, label: string): void {
  const bad = (what: string): UsageError => new UsageError(`${label}: ${what}`, { settings });
  const name = settings.name;
  if (typeof name !== 'string' || name.length === 0 || name.length > 80) throw bad(`the VM name must be 1 to 80 characters, not ${JSON.stringify(name)}`);
  // Control characters break every definition format; slashes are path separators to libvirt and Hyper-V.
  if (/[\u0000-\u001f\u007f/\\]/.test(name)) throw bad(`the VM name ${JSON.stringify(name)} contains a slash, backslash or control character`);
  if (name.trim() !== name) throw bad(`the VM name ${JSON.stringify(name)} starts or ends with a space`);
  if (!Number.isInteger(settings.cpus) || settings.cpus < 1 || settings.cpus > 256) throw bad(`cpus must be an integer from 1 to 256, not ${settings.cpus}`);
  if (!Number.isInteger(settings.memoryMiB) || settings.memoryMiB < 4) throw bad(`memoryMiB must be an integer of at least 4, not ${settings.memoryMiB}`);
  if (settings.firmware !== 'bios' && settings.firmware !== 'uefi') throw bad(`firmware is "bios" or "uefi", not ${JSON.stringify(settings.firmware)}`);
  if (settings.network !== undefined && (settings.network === '' || /[\u0000-\u001f\u007f]/.test(settings.network))) {
    throw bad(`the network name ${JSON.stringify(settings.network)} is empty or contains a control character`);
  }
  if (settings.serialLog !== undefined && !settings.serialLog.startsWith('/')) throw bad(`serialLog must be an absolute path on the host, not ${JSON.stringify(settings.serialLog)}`);
}

export function checkTestBootOptions(options: { marker?: string; timeoutMs: number; runMs?: number }, defaultRunMs: number): number {
  if (!(options.timeoutMs > 0)) throw new UsageError(`a test boot needs a positive timeout, not ${options.timeoutMs} ms`);
  if (options.marker !== undefined && options.marker.length === 0) throw new UsageError('the test boot marker is empty; give the text the guest prints, or no marker');
  const runMs = options.runMs ?? Math.min(defaultRunMs, options.timeoutMs);
  if (options.marker === undefined && runMs > options.timeoutMs) {
    throw new UsageError(`a test boot without a marker must run ${runMs} ms, longer than its timeout of ${options.timeoutMs} ms`);
  }
  return runMs;
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** The last `lines` non-empty lines of a console, for a message (one line, control characters shown). */
export function consoleTail(text: string, lines = 3): string {
  const tail = text.split(/\r?\n/).filter((l) => l.trim() !== '').slice(-lines).join(' | ');
  const shown = tail.replace(/[\u0000-\u001f\u007f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
  return shown.length > 200 ? `…${shown.slice(-200)}` : shown;
}

/**
 * Runs `body`, then `cleanup` whatever happened. A cleanup failure after a failed body is
 * dropped (the body's error says what went wrong first); after a successful body it is thrown,
 * because something the test boot made is still on the host.
 */
export async function withCleanup<T>(cleanup: () => Promise<void>, body: () => Promise<T>): Promise<T> {
  let result: T;
  try {
    result = await body();
  } catch (e) {
    await cleanup().catch(() => {});
    throw e;
  }
  await cleanup();
  return result;
}

/** How a test boot's VM is watched: its serial console, whether it still runs, a screenshot. */
export interface BootWatch {
  readConsole(): Promise<string>;
  /** null while the VM runs, else its state in words ("shut off", "gone"). */
  stoppedState(): Promise<string | null>;
  /** Without a marker, once it has run long enough: saves a screenshot, returns its path. */
  screenshot?(): Promise<string>;
}

const POLL_MS = 250;

/**
 * Polls the VM until the marker shows on its console (or, with no marker, until it has run
 * `runMs`), it stops, or the timeout passes. The result says which, in one line.
 */
export async function watchBoot(
  request: { marker?: string; timeoutMs: number; signal?: AbortSignal; onProgress?: (message: string) => void },
  runMs: number,
  started: number,
  watch: BootWatch,
): Promise<TestBootResult> {
  const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
  const { marker } = request;
  for (;;) {
    await sleep(POLL_MS, request.signal);
    const elapsedMs = Date.now() - started;
    const console = await watch.readConsole();
    if (marker !== undefined && console.includes(marker)) {
      return { ok: true, how: 'marker', elapsedMs, console, detail: `"${marker}" appeared on the serial console after ${seconds(elapsedMs)}` };
    }
    const stopped = await watch.stoppedState();
    if (stopped !== null) {
      return {
        ok: false, elapsedMs, console,
        detail: `the VM stopped (${stopped}) after ${seconds(elapsedMs)}${marker !== undefined ? ` before printing "${marker}"` : ''}; its serial console said: ${consoleTail(console) || '(nothing)'}`,
      };
    }
    if (marker === undefined && elapsedMs >= runMs) {
      const screenshotPath = watch.screenshot ? await watch.screenshot() : undefined;
      return {
        ok: true, how: 'ran', elapsedMs, console,
        detail: `the VM kept running for ${seconds(elapsedMs)} (no marker was asked for)${screenshotPath ? `; its screen is in ${screenshotPath}` : ''}`,
        ...(screenshotPath ? { screenshotPath } : {}),
      };
    }
    if (elapsedMs >= request.timeoutMs) {
      return { ok: false, elapsedMs, console, detail: `"${marker}" did not appear on the serial console within ${seconds(request.timeoutMs)}; it said: ${consoleTail(console) || '(nothing)'}` };
    }
  }
}
