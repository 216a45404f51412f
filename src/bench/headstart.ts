/**
 * HeadStart benchmark (scripts/bench/headstart). A sparse disk (default 16 GiB) with
 * scattered data is backed up (base), then --changed bytes (default 256 MiB, in 1 MiB runs
 * at random places) are rewritten and an incremental is taken. A standby VHDX is seeded
 * from the base (not timed), then the incremental is applied and timed:
 *   - over SFTP to a VHDX through a real sshd on 127.0.0.1, against `scp` of a file of the
 *     same size through the same sshd (the transport's ceiling); target >= 0.7x;
 *   - to a local VHDX, against `dd conv=notrunc` of the same runs into a raw file (then
 *     `sync -f`, as ours ends with fsyncs); target >= 0.5x.
 * The apply is timed without its read-back check, whose cost is printed beside it. Each
 * standby is checked with `qemu-img compare` against the raw disk.
 */
import { open, rm, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../chain/backup.js';
import { KeyRing } from '../chain/image/reader.js';
import { startSshd } from '../devkit/sshd.js';
import { formats } from '../formats/drivers.js';
import { LocalHost, SshHost, type Host } from '../headstart/host.js';
import { validateJob } from '../headstart/job.js';
import { runPass, type StepReport } from '../headstart/standby.js';
import { MiB, Rng, checkOptions, cleanupOnSignal, fmtBytes, fmtS, mibps, parseArgs, parseSize, pass, scratchDir, timeShell } from './common.js';

const USAGE = `usage: scripts/bench/headstart [--size 16G] [--changed 256M] [--seed N] [--keep]
  --size     virtual disk size; default 16G
  --changed  bytes the incremental changes, in 1 MiB runs; default 256M
  --seed     PRNG seed; default 1
  --keep     keep the scratch directory ($BENCH_DIR or the system temp dir)`;

const args = parseArgs(process.argv.slice(2), ['keep', 'help']);
if (args.options.has('help')) {
  console.log(USAGE);
  process.exit(0);
}
checkOptions(args, ['size', 'changed', 'seed', 'keep', 'help']);
const size = parseSize(args.options.get('size') ?? '16G');
const changed = parseSize(args.options.get('changed') ?? '256M');
const keep = args.options.has('keep');
const rng = new Rng(Number(args.options.get('seed') ?? 1));
const RUN = MiB;

/** `count` distinct 1 MiB-aligned offsets, ascending. */
function distinctRuns(count: number): number[] {
  const slots = Math.floor(size / RUN);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(rng.u32() % slots);
  return [...chosen].sort((a, b) => a - b).map((s) => s * RUN);
}

function randomBytes(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i += 4) b.writeUInt32LE(rng.u32(), i);
  return b;
}

const dir = await scratchDir('headstart');
const cleanup = cleanupOnSignal(dir, keep);
let failed = false;
try {
  const raw = join(dir, 'disk.raw');
  await open(raw, 'w').then((h) => h.close());
  await truncate(raw, size);
  const t0 = Date.UTC(2026, 0, 5, 8);
  const fh = await open(raw, 'r+');
  const changes = join(dir, 'changes.bin');
  const ch = await open(changes, 'w');
  let runs: number[];
  try {
    // The base: as much data as the change, elsewhere on the disk.
    for (const at of distinctRuns(changed / RUN)) await fh.write(randomBytes(RUN), 0, RUN, at);
    await fh.sync();
    await backup(raw, join(dir, 'folder'), { forensic: true, at: t0, volume: 'SYS' });
    runs = distinctRuns(changed / RUN);
    for (let i = 0; i < runs.length; i++) {
      const data = randomBytes(RUN);
      await fh.write(data, 0, RUN, runs[i]!);
      await ch.write(data, 0, RUN, i * RUN);
    }
    await fh.sync();
  } finally {
    await fh.close();
    await ch.close();
  }
  await backup(raw, join(dir, 'folder'), { forensic: true, at: t0 + 3600_000, volume: 'SYS' });
  console.log(`headstart: ${fmtBytes(size)} disk, base with ${fmtBytes(changed)} of data, an incremental that changed ${fmtBytes(changed)} in ${runs.length} runs of 1 MiB`);

  // Seeds with a lag that excludes the incremental, then times the pass that applies it.
  const applyOnce = async (host: Host, target: string, jobTarget: string): Promise<StepReport> => {
    const job = validateJob({ version: 1, source: join(dir, 'folder'), target: jobTarget, disk: 'standby.vhdx', format: 'vhdx', lag: '1h' }, 'bench job');
    const ctx = { job, host, dir: target, registry: formats, keyring: new KeyRing(null) };
    await host.mkdirp(target);
    await runPass({ ...ctx, now: t0 + 3600_000 + 30 * 60_000 });
    await timeShell('sync');
    const r = await runPass({ ...ctx, lag: { kind: 'newest' } });
    const step = r.steps.find((s) => s.kind === 'apply');
    if (!step) throw new Error('the timed pass applied nothing');
    const same = await timeShell(`qemu-img compare -q -f raw -F vhdx '${raw}' '${join(target, 'standby.vhdx')}'`).then(() => true, () => false);
    if (!same) {
      failed = true;
      console.log(`headstart: the standby in ${target} is NOT identical to the source disk`);
    }
    return step;
  };

  const sshd = await startSshd();
  try {
    const remoteDir = join(dir, 'remote');
    const host = await SshHost.connect(sshd.connectOptions());
    let step: StepReport;
    try {
      step = await applyOnce(host, remoteDir, `ssh://${sshd.username}@127.0.0.1:${sshd.port}${remoteDir}`);
    } finally {
      await host.close();
    }
    const scp = await timeShell(`scp -q -i '${sshd.privateKeyPath}' -o UserKnownHostsFile='${sshd.knownHostsPath}' -o StrictHostKeyChecking=yes ` +
      `-P ${sshd.port} '${changes}' ${sshd.username}@127.0.0.1:'${join(dir, 'scp-copy.bin')}'`);
    const apply = step.seconds - (step.readBack?.seconds ?? 0);
    const ratio = scp.seconds / apply;
    console.log(`headstart sftp apply: ${fmtBytes(step.written.bytes)} to a VHDX over SFTP ${fmtS(apply)} ${mibps(step.written.bytes, apply)}, ` +
      `scp of ${fmtBytes(changed)} ${fmtS(scp.seconds)} ${mibps(changed, scp.seconds)}, ratio ${ratio.toFixed(2)}x (target >= 0.7x: ${pass(ratio >= 0.7)}); ` +
      `read-back check ${fmtS(step.readBack?.seconds ?? 0)} more`);
  } finally {
    await sshd.stop();
  }

  const localDir = join(dir, 'local');
  const step = await applyOnce(new LocalHost(), localDir, localDir);
  const target = join(dir, 'dd-target.raw');
  await open(target, 'w').then((h) => h.close());
  await truncate(target, size);
  const script = runs.map((at, i) => `dd if='${changes}' of='${target}' bs=1M skip=${i} seek=${at / RUN} count=1 conv=notrunc status=none`).join('\n');
  await timeShell('sync');
  const dd = await timeShell(`${script}\nsync -f '${target}'`);
  const apply = step.seconds - (step.readBack?.seconds ?? 0);
  const ratio = dd.seconds / apply;
  console.log(`headstart local apply: ${fmtBytes(step.written.bytes)} to a local VHDX ${fmtS(apply)} ${mibps(step.written.bytes, apply)}, ` +
    `dd conv=notrunc of the same runs ${fmtS(dd.seconds)} ${mibps(changed, dd.seconds)}, ratio ${ratio.toFixed(2)}x (target >= 0.5x: ${pass(ratio >= 0.5)}); ` +
    `read-back check ${fmtS(step.readBack?.seconds ?? 0)} more`);
} finally {
  await cleanup();
  if (!keep) await rm(dir, { recursive: true, force: true });
}
process.exitCode = failed ? 1 : 0;
