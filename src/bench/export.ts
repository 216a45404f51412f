/**
 * Export benchmark (scripts/bench/export). A generated disk (default 2 GiB: ~1/3 random,
 * ~1/3 text-like, ~1/3 zero, in chunks of 1-7 MiB) is backed up in full (--forensic, so the
 * point holds exactly the disk). Then, for each format, best of --runs, alternating:
 *   - ours: the point exported in-process with exportDisk (chain read, zstd decoded, every
 *     block checked against its digest, the format written, fsynced, renamed);
 *   - the peer on the same data: `qemu-img convert -f raw -O FMT` from the raw disk (then
 *     `sync -f` of its output, since ours ends with an fsync), and for streamOptimized
 *     Debian's python3-vmdkstream (`VMDKstream.convert_to_stream`).
 * Each output is checked with `qemu-img compare` against the raw disk once. One line per
 * figure: MiB/s of virtual disk, and ours/peer (targets: >= 1.0). Before each timed run its
 * old output is removed and `sync` waits out their writeback. A first line times our
 * read-decode-check pipeline alone, the floor under every export of ours.
 */
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { backup } from '../chain/backup.js';
import { copyPointInto, exportDisk } from '../chain/export-disk.js';
import { KeyRing } from '../chain/image/reader.js';
import { openPoint } from '../chain/open.js';
import { formats } from '../formats/drivers.js';
import { Rng, checkOptions, cleanupOnSignal, fmtBytes, fmtS, mibps, parseArgs, parseSize, pass, scratchDir, secs, timeShell } from './common.js';
import { contiguousChunks, writeDisk } from './collapse-disk.js';

const USAGE = `usage: scripts/bench/export [--size 2G] [--runs 3] [--seed N] [--only vhd,vmdk-stream] [--keep]
  --size   disk size (binary units); default 2G
  --runs   timed runs of each side (the fastest counts); default 3
  --only   comma-separated cases: vhd, vhd-fixed, vhdx, vmdk, vmdk-stream, vmdk-vmfs, qcow2
  --seed   PRNG seed; default 1
  --keep   keep the scratch directory ($BENCH_DIR or the system temp dir)`;

interface Case {
  name: string;
  format: string;
  subformat?: string;
  ext: string;
  peerName: string;
  peer: (raw: string, out: string) => string;
  target: number;
}

const qemu = (fmt: string, opts: string) => (raw: string, out: string) =>
  `qemu-img convert -f raw -O ${fmt} ${opts ? `-o ${opts} ` : ''}'${raw}' '${out}' && sync -f '${out}'`;

const CASES: Case[] = [
  { name: 'vhd', format: 'vhd', subformat: 'dynamic', ext: 'vhd', peerName: 'qemu-img convert -O vpc', peer: qemu('vpc', 'subformat=dynamic'), target: 1.0 },
  { name: 'vhd-fixed', format: 'vhd', subformat: 'fixed', ext: 'vhd', peerName: 'qemu-img convert -O vpc -o subformat=fixed', peer: qemu('vpc', 'subformat=fixed,force_size=on'), target: 1.0 },
  { name: 'vhdx', format: 'vhdx', ext: 'vhdx', peerName: 'qemu-img convert -O vhdx', peer: qemu('vhdx', 'subformat=dynamic'), target: 1.0 },
  { name: 'vmdk', format: 'vmdk', subformat: 'monolithicSparse', ext: 'vmdk', peerName: 'qemu-img convert -O vmdk', peer: qemu('vmdk', 'subformat=monolithicSparse'), target: 1.0 },
  { name: 'vmdk-vmfs', format: 'vmdk', subformat: 'vmfs', ext: 'vmdk', peerName: 'qemu-img convert -O vmdk -o subformat=monolithicFlat', peer: qemu('vmdk', 'subformat=monolithicFlat'), target: 1.0 },
  {
    name: 'vmdk-stream', format: 'vmdk', subformat: 'streamOptimized', ext: 'vmdk', peerName: 'python3-vmdkstream',
    peer: (raw, out) => `/usr/bin/python3 -c "import VMDKstream; VMDKstream.convert_to_stream('${raw}', '${out}')" && sync -f '${out}'`, target: 1.0,
  },
  { name: 'qcow2', format: 'qcow2', ext: 'qcow2', peerName: 'qemu-img convert -O qcow2', peer: qemu('qcow2', ''), target: 1.0 },
];

const args = parseArgs(process.argv.slice(2), ['keep', 'help']);
if (args.options.has('help')) {
  console.log(USAGE);
  process.exit(0);
}
checkOptions(args, ['size', 'runs', 'seed', 'only', 'keep', 'help']);
const size = parseSize(args.options.get('size') ?? '2G');
const runs = Number(args.options.get('runs') ?? 3);
const only = args.options.get('only')?.split(',');
const keep = args.options.has('keep');
const rng = new Rng(Number(args.options.get('seed') ?? 1));

const dir = await scratchDir('export');
const cleanup = cleanupOnSignal(dir, keep);
let failed = false;
try {
  const raw = join(dir, 'disk.raw');
  const kinds = await writeDisk(raw, size, contiguousChunks(size, rng, ['random', 'text', 'zero']), rng);
  console.log(`export: ${fmtBytes(size)} disk (${fmtBytes(kinds.random)} random, ${fmtBytes(kinds.text)} text, ${fmtBytes(kinds.zero)} zero), best of ${runs}`);
  const folder = join(dir, 'folder');
  const full = await backup(raw, folder, { forensic: true, at: Date.UTC(2024, 0, 1) });
  const floor = await decodeAlone(full.path, runs);
  console.log(`export decode alone: the point's blocks read, decoded and checked (zstd + SHA-256 of every block, what qemu-img reading a raw file does not do), nothing written: ${fmtS(floor.seconds)} ${mibps(size, floor.seconds)}, CPU ${fmtS(floor.cpu)}; ours cannot be faster than this`);
  for (const c of CASES) {
    if (only && !only.includes(c.name)) continue;
    let ours = Infinity;
    let theirs = Infinity;
    const outOurs = join(dir, `ours.${c.ext}`);
    const outPeer = join(dir, `peer.${c.ext}`);
    const timePeer = async () => (await timeShell(c.peer(raw, outPeer))).seconds;
    const timeOurs = async () => {
      const { point } = await openPoint(full.path, new KeyRing(null));
      const t0 = performance.now();
      try {
        await exportDisk(point, outOurs, formats, { format: c.format, subformat: c.subformat });
      } finally {
        await point.close();
      }
      return secs(t0);
    };
    for (let r = 0; r < runs; r++) {
      // Each side starts from the same state: its old output gone and nothing left to write
      // back (a deleted file's discards otherwise land in the run that follows). The order alternates.
      const sides = r % 2 === 0 ? ['peer', 'ours'] : ['ours', 'peer'];
      for (const side of sides) {
        await removeOutputs(side === 'peer' ? outPeer : outOurs);
        await timeShell('sync');
        if (side === 'peer') theirs = Math.min(theirs, await timePeer());
        else ours = Math.min(ours, await timeOurs());
      }
    }
    const fmt = c.format === 'vhd' ? 'vpc' : c.format;
    const same = await timeShell(`qemu-img compare -q -f raw -F ${fmt} '${raw}' '${outOurs}'`).then(() => true, () => false);
    if (!same) failed = true;
    const [a, b] = await Promise.all([filesBytes(outOurs), filesBytes(outPeer)]);
    const ratio = theirs / ours;
    console.log(`export ${c.name}: ours ${fmtS(ours)} ${mibps(size, ours)}, ${c.peerName} ${fmtS(theirs)} ${mibps(size, theirs)}, ` +
      `ratio ${ratio.toFixed(2)}x (target >= ${c.target.toFixed(1)}x: ${pass(ratio >= c.target)}); ` +
      `files ${fmtBytes(a ?? 0)} vs ${fmtBytes(b ?? 0)}; qemu-img compare: ${same ? 'identical' : 'DIFFERENT'}`);
  }
} finally {
  await cleanup();
  if (!keep) await rm(dir, { recursive: true, force: true });
}
process.exitCode = failed ? 1 : 0;

async function removeOutputs(path: string): Promise<void> {
  await rm(path, { force: true });
  await rm(path.replace(/\.vmdk$/, '-flat.vmdk'), { force: true });
}

/** Apparent bytes of a disk's files (a VMDK's `-flat.vmdk` extent included). */
async function filesBytes(path: string): Promise<number> {
  const sizes = await Promise.all([path, path.replace(/\.vmdk$/, '-flat.vmdk')].map((p) => stat(p).then((s) => s.size, () => 0)));
  return path.endsWith('.vmdk') ? sizes[0]! + sizes[1]! : sizes[0]!;
}

/** Best of `runs`: the export's own read-decode-check pipeline into a sink (no file). */
async function decodeAlone(image: string, runs: number): Promise<{ seconds: number; cpu: number }> {
  let best = { seconds: Infinity, cpu: 0 };
  for (let r = 0; r < runs; r++) {
    const { point } = await openPoint(image, new KeyRing(null));
    const t0 = performance.now();
    const c0 = process.cpuUsage();
    try {
      await copyPointInto(point, { write: async () => {} }, {}, () => {});
    } finally {
      await point.close();
    }
    const seconds = secs(t0);
    const c = process.cpuUsage(c0);
    if (seconds < best.seconds) best = { seconds, cpu: (c.user + c.system) / 1e6 };
  }
  return best;
}
