/**
 * The VM side of a job: checking that the disk suits the hypervisor, defining the VM when a
 * seed has made its disk, failover, and the test boot.
 *
 * Failover order: bring the disk to the newest point, record `failedOver` in the state file,
 * then define and start the VM. Recording first means a job run racing the start, or a
 * crash right after it, never writes the disk the VM is using.
 */
import { posix } from 'node:path';
import { UsageError } from '../formats/errors.js';
import type { Job } from './job.js';
import { assertWritable, runPass, settledState, type RunReport, type StandbyContext } from './standby.js';
import { loadStandbyState, saveStandbyState } from './standby-state.js';
import { hypervisorFor } from './vm/index.js';
import type { StandbyVm, VmSettings } from './vm/types.js';

function vmOf(job: Job): VmSettings {
  if (!job.vm) throw new UsageError(`the job has no "vm" settings; add at least {"name": ...} to use a hypervisor`);
  return job.vm;
}

/** Throws a clear error when the job's disk format does not suit its hypervisor. */
export function checkJobDisk(job: Job): void {
  if (job.hypervisor === 'none') return;
  const hv = hypervisorFor(job.hypervisor);
  hv.checkDisk(job.format, job.subformat, vmOf(job));
  hv.checkSettings(vmOf(job));
}

function standbyVm(ctx: StandbyContext): StandbyVm {
  const { job } = ctx;
  return { settings: vmOf(job), diskPath: posix.join(ctx.dir, job.disk), diskFormat: job.format, ...(job.subformat ? { diskSubformat: job.subformat } : {}) };
}

/** Defines (or redefines) the VM on the host, pointing at the standby disk. */
export async function defineVm(ctx: StandbyContext): Promise<void> {
  if (ctx.job.hypervisor === 'none') return;
  await hypervisorFor(ctx.job.hypervisor).define(ctx.host, standbyVm(ctx));
}

/**
 * A pass of `headstart run`: refuses while the standby VM runs (someone started it: the disk
 * is the VM's now, and is recorded as failed over), then seeds or applies, and defines the VM
 * once a seed has made (or replaced) its disk.
 */
export async function runJob(ctx: StandbyContext): Promise<RunReport> {
  const { job, host, dir } = ctx;
  if (job.hypervisor !== 'none') {
    const state = await loadStandbyState(host, dir, job.disk);
    assertWritable(state, ctx);
    if (state?.applied && (await hypervisorFor(job.hypervisor).isRunning(host, standbyVm(ctx)))) {
      await saveStandbyState(host, dir, { ...state, failedOver: { at: Date.now() } });
      assertWritable(await loadStandbyState(host, dir, job.disk), ctx);
    }
  }
  const report = await runPass(ctx);
  if (report.steps.some((s) => s.kind === 'seed')) await defineVm(ctx);
  return report;
}

export interface FailoverReport {
  run: RunReport;
  vm: string | null;
  started: boolean;
  summary: string;
}

export async function failover(ctx: StandbyContext): Promise<FailoverReport> {
  const { job, host, dir } = ctx;
  checkJobDisk(job);
  const before = await loadStandbyState(host, dir, job.disk);
  let run: RunReport;
  if (before?.failedOver) {
    // A second failover (the first start failed, or the VM was stopped): only start it.
    run = { applied: before.applied, steps: [], upToDate: true };
  } else {
    assertWritable(before, ctx);
    run = await runPass({ ...ctx, lag: { kind: 'newest' } });
    const state = await settledState(ctx);
    await saveStandbyState(host, dir, { ...state, failedOver: { at: Date.now() } });
  }
  if (job.hypervisor === 'none') {
    return { run, vm: null, started: false, summary: `failed over: ${host.label}:${posix.join(dir, job.disk)} holds point ${run.applied?.point} and will not be written again; no hypervisor is configured, so start a VM on it yourself` };
  }
  const hv = hypervisorFor(job.hypervisor);
  const settings = vmOf(job);
  // A second failover finds the VM running: its definition is left alone (define refuses then).
  if (!(await hv.isRunning(host, standbyVm(ctx)))) {
    await defineVm(ctx);
    await hv.start(host, standbyVm(ctx));
  }
  return { run, vm: settings.name, started: true, summary: `failed over: VM ${settings.name} started on ${host.label} from point ${run.applied?.point}; the job will not write its disk again` };
}

export interface VerifyBootReport {
  ok: boolean;
  point: number;
  detail: string;
  how: string | null;
  console: string;
  screenshotPath: string | null;
  seconds: number;
  summary: string;
}

export async function verifyBoot(ctx: StandbyContext, opts: { marker?: string; timeoutMs: number }): Promise<VerifyBootReport> {
  const { job, host } = ctx;
  if (job.hypervisor === 'none') throw new UsageError('verify-boot needs a hypervisor in the job (libvirt, esx or hyperv)');
  const state = await settledState(ctx);
  const hv = hypervisorFor(job.hypervisor);
  const r = await hv.testBoot(host, {
    ...standbyVm(ctx), timeoutMs: opts.timeoutMs, ...(opts.marker ? { marker: opts.marker } : {}),
    ...(ctx.signal ? { signal: ctx.signal } : {}), ...(ctx.log ? { onProgress: ctx.log } : {}),
  });
  const point = state.applied!.point;
  return { ok: r.ok, point, detail: r.detail, how: r.how ?? null, console: r.console, screenshotPath: r.screenshotPath ?? null, seconds: r.elapsedMs / 1000, summary: `${r.ok ? 'booted' : 'FAILED to boot'}: point ${point} on a throwaway overlay; ${r.detail}` };
}
