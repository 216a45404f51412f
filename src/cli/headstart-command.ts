/**
 * `imagekeep headstart init|run|status|verify-boot|failover`: a standby disk kept close
 * behind a backup chain (SPEC §10). The job file says what to follow and where the disk is;
 * the state file beside the disk says what it holds.
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Command, Option } from 'commander';
import { KeyRing } from '../chain/image/reader.js';
import { folderTimeZone } from '../chain/config.js';
import { parseLocalTime } from '../chain/policy/calendar.js';
import { RefusedError, UsageError } from '../formats/errors.js';
import { formats } from '../formats/drivers.js';
import { connectTarget } from '../headstart/connect.js';
import { DISK_FORMATS, HYPERVISORS, defaultDiskName, loadJob, parseLag, saveJob, validateJob, type Job } from '../headstart/job.js';
import { currentChain } from '../headstart/source-points.js';
import { loadStandbyState, type RunReport, type StandbyContext } from '../headstart/standby.js';
import { checkJobDisk, failover, runJob, verifyBoot } from '../headstart/vm-actions.js';
import { humanBytes, progressBar, readPassword } from './output.js';

function line(text: string): void {
  console.log(text);
}

async function context(job: Job, o: { now?: string; json?: boolean }, signal: AbortSignal): Promise<StandbyContext & { close: () => Promise<void> }> {
  const { host, dir } = await connectTarget(job);
  const now = o.now ? parseLocalTime(o.now, await folderTimeZone(job.source), '--now') : undefined;
  const keyring = new KeyRing(await readPassword(job.passwordFile));
  const bar = o.json ? null : progressBar('headstart');
  return {
    job, host, dir, registry: formats, keyring, signal,
    ...(now !== undefined ? { now } : {}),
    ...(process.env.IMAGEKEEP_HEADSTART_CHECKPOINT ? { checkpointBytes: Number(process.env.IMAGEKEEP_HEADSTART_CHECKPOINT) } : {}),
    log: o.json ? undefined : line,
    onProgress: bar ? (_what, done, total) => bar.update(done, total) : undefined,
    close: async () => {
      bar?.stop();
      await host.close();
    },
  };
}

function describeRun(r: RunReport): string[] {
  const out: string[] = [];
  for (const s of r.steps) {
    out.push(`${s.kind}: point ${s.from ? s.from.point : '-'} -> ${s.to.point}: ${s.written.blocks} blocks, ${humanBytes(s.written.bytes)} written` +
      `${s.readBack ? `, ${s.readBack.blocks} read back and checked` : ''} in ${s.seconds.toFixed(1)} s`);
  }
  out.push(r.upToDate ? `up to date: the disk holds point ${r.applied?.point} (${r.applied ? new Date(r.applied.time).toISOString() : '-'}); nothing written`
    : `the disk holds point ${r.applied?.point} (${r.applied ? new Date(r.applied.time).toISOString() : '-'})`);
  return out;
}

export function addHeadstartCommands(program: Command, interrupt: AbortController): void {
  const hs = program.command('headstart')
    .summary('keep a standby virtual disk (and VM) on a Hyper-V, ESXi or libvirt host close behind a chain')
    .description('HeadStart Restore: a standby disk seeded from a chain\'s base and brought forward, point by point, by ' +
      'writing only the blocks that changed, over SSH (SFTP) or to a local folder. The VM is defined on the host; ' +
      'failover brings the disk to the newest point and starts it.');

  hs.command('init')
    .summary('write a job file')
    .argument('<job>', 'job file to write (JSON)')
    .requiredOption('--source <folder>', 'backup folder the disk follows')
    .requiredOption('--target <dir>', 'local folder, or ssh://user@host[:port]/dir on the hypervisor host')
    .addOption(new Option('--format <format>', 'disk format').choices([...DISK_FORMATS]).makeOptionMandatory())
    .option('--subformat <name>', 'vhdx: dynamic|fixed; vhd: dynamic|fixed; vmdk: vmfs|monolithicFlat|monolithicSparse; qcow2: v3')
    .addOption(new Option('--hypervisor <kind>', 'what runs the VM').choices([...HYPERVISORS]).default('none'))
    .option('--name <vm>', 'VM name (required with a hypervisor)')
    .option('--cpus <n>', 'virtual CPUs', '2')
    .option('--memory <MiB>', 'memory in MiB', '2048')
    .addOption(new Option('--firmware <kind>', 'bios, or uefi (Hyper-V: uefi = Generation 2, VHDX only)').choices(['bios', 'uefi']).default('bios'))
    .option('--network <name>', 'libvirt network / Hyper-V switch / ESXi port group')
    .option('--serial-log <path>', 'libvirt: file on the host that receives the serial console')
    .option('--volume <name>', 'with a folder holding several volumes: which one')
    .option('--disk <file>', 'disk file name on the target (default: from the VM name)')
    .option('--lag <policy>', 'newest | daily | <N>h (at least N hours behind)', 'newest')
    .option('--bandwidth <MBps>', 'bandwidth limit for writes, in MB/s')
    .option('--identity <file>', 'SSH private key (default ~/.ssh/id_ed25519, id_ecdsa, id_rsa)')
    .option('--known-hosts <file>', 'known_hosts pinning the host key (default ~/.ssh/known_hosts)')
    .option('--password-file <file>', 'password of an encrypted chain')
    .option('--force', 'replace an existing job file')
    .option('--json', 'print the job as JSON')
    .action(async (jobPath: string, o) => {
      if (!o.force && (await stat(jobPath).catch(() => null))) throw new UsageError(`${jobPath} exists; pass --force to replace it`);
      parseLag(o.lag);
      const source = resolve(o.source);
      const chain = await currentChain(source, o.volume);
      const vm = o.name ? { name: o.name, cpus: Number(o.cpus), memoryMiB: Number(o.memory), firmware: o.firmware, ...(o.network ? { network: o.network } : {}), ...(o.serialLog ? { serialLog: o.serialLog } : {}) } : undefined;
      const doc = {
        version: 1, source, volume: chain.volume, target: o.target, disk: o.disk ?? defaultDiskName(o.name ?? chain.volume, o.format),
        format: o.format, ...(o.subformat ? { subformat: o.subformat } : {}), hypervisor: o.hypervisor, ...(vm ? { vm } : {}), lag: o.lag,
        ...(o.bandwidth ? { bandwidthMBps: Number(o.bandwidth) } : {}),
        ...(o.identity || o.knownHosts ? { ssh: { ...(o.identity ? { identity: resolve(o.identity) } : {}), ...(o.knownHosts ? { knownHosts: resolve(o.knownHosts) } : {}) } } : {}),
        ...(o.passwordFile ? { passwordFile: resolve(o.passwordFile) } : {}),
      };
      const job = validateJob(doc, '--options');
      checkJobDisk(job);
      await saveJob(jobPath, job);
      if (o.json) line(JSON.stringify(job, null, 2));
      else line(`${jobPath}: ${job.format}${job.subformat ? `/${job.subformat}` : ''} disk ${job.disk} at ${job.target} following ${job.volume} in ${job.source}; run: imagekeep headstart run ${jobPath}`);
    });

  hs.command('run')
    .summary('seed the disk, or bring it to the newest point the lag allows')
    .argument('<job>')
    .option('--watch', 'keep running: apply again whenever the folder changes')
    .option('--interval <seconds>', 'with --watch: how often to look for new points', '60')
    .option('--now <time>', 'act as if it were this time (the lag policy counts back from it)')
    .option('--json', 'print the report as JSON')
    .action(async (jobPath: string, o) => {
      const job = await loadJob(jobPath);
      for (;;) {
        const ctx = await context(job, o, interrupt.signal);
        let report: RunReport;
        try {
          report = await runJob(ctx);
        } finally {
          await ctx.close();
        }
        if (o.json) line(JSON.stringify(report));
        else describeRun(report).forEach(line);
        if (!o.watch) return;
        const wait = Math.max(1, Number(o.interval)) * 1000;
        await new Promise<void>((done) => {
          const t = setTimeout(done, wait);
          interrupt.signal.addEventListener('abort', () => { clearTimeout(t); done(); }, { once: true });
        });
        if (interrupt.signal.aborted) return;
      }
    });

  hs.command('status')
    .summary('what the standby disk holds, and how far behind the folder it is')
    .argument('<job>')
    .option('--json', 'print as JSON')
    .action(async (jobPath: string, o) => {
      const job = await loadJob(jobPath);
      const { host, dir } = await connectTarget(job);
      try {
        const state = await loadStandbyState(host, dir, job.disk);
        const chain = await currentChain(job.source, job.volume);
        const newest = Math.max(...chain.files.map((f) => f.last));
        const newestFile = chain.files.find((f) => f.last === newest)!;
        const disk = await host.stat(`${dir}/${job.disk}`);
        const status = {
          job: resolve(jobPath), host: host.label, disk: `${dir}/${job.disk}`, diskBytes: disk?.size ?? null,
          chain: { volume: chain.volume, base: chain.base, newestPoint: newest, newestTime: newestFile.header.pointTime },
          applied: state?.applied ?? null,
          sameChain: state ? state.chainId === chain.chainId : false,
          pointsBehind: state?.applied && state.chainId === chain.chainId ? newest - state.applied.point : null,
          applying: state?.applying ?? null,
          seeding: state?.seeding ?? null,
          failedOver: state?.failedOver ?? null,
        };
        if (o.json) { line(JSON.stringify(status, null, 2)); return; }
        line(`disk      ${host.label}:${status.disk}${disk ? ` (${humanBytes(disk.size)} on the host)` : ' (not created yet)'}`);
        line(`folder    ${job.source}: ${chain.volume} chain ${chain.base}, newest point ${newest} (${new Date(newestFile.header.pointTime).toISOString()})`);
        line(`holds     ${state?.applied ? `point ${state.applied.point} of chain ${state.base} (${new Date(state.applied.time).toISOString()})${status.pointsBehind !== null ? `, ${status.pointsBehind} points behind` : ', an older chain'}` : 'nothing yet'}`);
        if (state?.seeding) line(`seeding   chain ${state.seeding.base}: block ${state.seeding.nextBlock}${state.seeding.complete ? ', complete, renames pending' : ''}`);
        if (state?.applying) line(`applying  point ${state.applying.point} (a run was cut short; the next run finishes it)`);
        if (state?.failedOver) line(`failed over ${new Date(state.failedOver.at).toISOString()}: the job no longer writes this disk`);
      } finally {
        await host.close();
      }
    });

  hs.command('verify-boot')
    .summary('test-boot the standby on a throwaway overlay (the standby is not changed)')
    .argument('<job>')
    .option('--marker <text>', 'text the guest prints on its serial console when it has booted')
    .option('--timeout <seconds>', 'how long to wait for the boot', '120')
    .option('--json', 'print the report as JSON')
    .action(async (jobPath: string, o) => {
      const job = await loadJob(jobPath);
      const ctx = await context(job, o, interrupt.signal);
      try {
        const r = await verifyBoot(ctx, { marker: o.marker, timeoutMs: Number(o.timeout) * 1000 });
        if (o.json) line(JSON.stringify(r, null, 2));
        else line(r.summary);
        if (!r.ok) throw new RefusedError('BOOT_FAILED', `the test boot of point ${r.point} failed: ${r.detail}`);
      } finally {
        await ctx.close();
      }
    });

  hs.command('failover')
    .summary('bring the disk to the newest point, define the VM if needed and start it')
    .argument('<job>')
    .option('--json', 'print the report as JSON')
    .action(async (jobPath: string, o) => {
      const job = await loadJob(jobPath);
      const ctx = await context(job, o, interrupt.signal);
      try {
        const r = await failover(ctx);
        if (o.json) line(JSON.stringify(r, null, 2));
        else { describeRun(r.run).forEach(line); line(r.summary); }
      } finally {
        await ctx.close();
      }
    });
}
