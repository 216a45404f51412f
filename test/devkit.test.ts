// Proves the devkit's simulated disks are real and behave: partitions sit where `layout` says (sfdisk), the filesystems pass e2fsck/ntfsfix/fsck.fat after every kind of change, manifests list the files and follow mutate, free-space garbage changes the image but no file, layouts are rediscovered from the image alone (GPT and MBR+logicals), seeds reproduce, and nothing stays mounted.
import { execFile } from 'node:child_process';
import { mkdtemp, open, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import { diffManifests, makeDisk, mountPoints, openDisk, type Manifest, type MutationOp, type Partition, type SimDisk } from '../src/devkit/index.js';
import { Prng } from '../src/devkit/prng.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;

async function sh(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { maxBuffer: 64 * MiB });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string };
    if (typeof e.code !== 'number') throw err;
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

interface SfdiskPart {
  node: string;
  start: number;
  size: number;
  type: string;
}

async function sfdiskParts(path: string): Promise<{ label: string; partitions: SfdiskPart[] }> {
  const r = await sh('sfdisk', ['--json', path]);
  const pt = (JSON.parse(r.stdout) as { partitiontable: { label: string; partitions: SfdiskPart[] } }).partitiontable;
  return { label: pt.label, partitions: pt.partitions };
}

/** Copies one partition out of the image into its own (sparse) file, as fsck tools need. */
async function extract(disk: SimDisk, part: Partition, dir: string): Promise<string> {
  const out = join(dir, `p${part.number}.img`);
  await rm(out, { force: true });
  const r = await sh('dd', [
    `if=${disk.path}`, `of=${out}`, 'bs=1M', `skip=${part.offset}`, `count=${part.length}`,
    'iflag=skip_bytes,count_bytes', 'conv=sparse', 'status=none',
  ]);
  if (r.code !== 0) throw new Error(`dd failed: ${r.stderr}`);
  return out;
}

/** Runs the filesystem's own checker on each volume, read-only; returns exit codes by partition. */
async function fsck(disk: SimDisk, dir: string): Promise<Record<number, { code: number; out: string }>> {
  const result: Record<number, { code: number; out: string }> = {};
  for (const part of disk.volumes) {
    const file = await extract(disk, part, dir);
    const r =
      part.fs === 'ext4' ? await sh('e2fsck', ['-fn', file])
      : part.fs === 'ntfs' ? await sh('ntfsfix', ['-n', file])
      : await sh('fsck.fat', ['-n', file]);
    result[part.number] = { code: r.code, out: `${r.stdout}${r.stderr}`.slice(-600) };
    await rm(file, { force: true });
  }
  return result;
}

function allClean(t: Test, results: Record<number, { code: number; out: string }>, when: string): void {
  for (const [n, r] of Object.entries(results)) t.equal(r.code, 0, `${when}: partition ${n} checks clean`, { output: r.out });
}

/** Fraction of 64 KiB blocks of a partition that are not all zeros. */
async function nonZeroFraction(disk: SimDisk, part: Partition): Promise<number> {
  const fh = await open(disk.path, 'r');
  try {
    const block = 64 * 1024;
    const buf = Buffer.alloc(block);
    const zero = Buffer.alloc(block);
    let nonZero = 0;
    for (let at = 0; at < part.length; at += block) {
      await fh.read(buf, 0, block, part.offset + at);
      if (!buf.equals(zero)) nonZero++;
    }
    return nonZero / (part.length / block);
  } finally {
    await fh.close();
  }
}

/** Every path in `after` vs `before` that changed must have been touched by an op; removed ones must be gone. */
function checkAgainstOps(t: Test, before: Manifest, after: Manifest, ops: MutationOp[]): void {
  const touched = new Set(ops.map((o) => `${o.partition}:${o.path}`));
  const d = diffManifests(before, after);
  t.ok(d.added.length + d.removed.length + d.changed.length > 0, 'the manifest changed');
  for (const e of [...d.added, ...d.removed, ...d.changed]) t.ok(touched.has(`${e.partition}:${e.path}`), `change to ${e.partition}:${e.path} was reported`);
  const last = new Map<string, MutationOp>();
  for (const o of ops) last.set(`${o.partition}:${o.path}`, o);
  const now = new Set(after.files.map((e) => `${e.partition}:${e.path}`));
  for (const [key, o] of last) t.equal(now.has(key), o.op !== 'remove', `${key} is ${o.op === 'remove' ? 'gone' : 'present'} after ${o.op}`);
}

async function ourMounts(root: string): Promise<string[]> {
  return (await mountPoints()).filter((m) => m.startsWith(root));
}

const root = await mkdtemp(join(tmpdir(), 'ik-devkit-test-'));
t.teardown(async () => {
  // Whatever a failed test left: unmount, then remove.
  for (const m of await ourMounts(root)) await sh('umount', ['-l', m]);
  await rm(root, { recursive: true, force: true });
});

t.test('prng: same seed, same stream; different seed, different stream', async (t) => {
  const a = new Prng(42);
  const b = new Prng(42);
  const c = new Prng(43);
  const sa = Array.from({ length: 8 }, () => a.u32());
  t.same(sa, Array.from({ length: 8 }, () => b.u32()));
  t.not(JSON.stringify(sa), JSON.stringify(Array.from({ length: 8 }, () => c.u32())));
  t.same(new Prng(7).bytes(100), new Prng(7).bytes(100), 'keystream bytes are seeded too');
  const r = new Prng(1);
  for (let i = 0; i < 1000; i++) {
    const v = r.int(3, 9);
    if (v < 3 || v >= 9) t.fail(`int(3, 9) gave ${v}`);
  }
  t.throws(() => new Prng(1.5), RangeError);
});

t.test('GPT disk: NTFS + ext4', async (t) => {
  const dir = await mkdtemp(join(root, 'gpt-'));
  const scratch = await mkdtemp(join(root, 'gpt-scratch-'));
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 256 * MiB, seed: 11, tmpDir: scratch });
  t.teardown(() => disk.cleanup());

  const table = await sfdiskParts(disk.path);
  t.equal(table.label, 'gpt');
  t.same(
    table.partitions.map((p) => ({ offset: p.start * 512, length: p.size * 512, type: p.type })),
    disk.layout.partitions.map((p) => ({ offset: p.offset, length: p.length, type: p.type })),
    'partitions are where layout says',
  );
  t.same(disk.layout.partitions.map((p) => [p.number, p.fs, p.label]), [[1, 'ntfs', 'windows'], [2, 'ext4', 'data']]);
  for (const p of disk.layout.partitions) t.equal(p.offset % MiB, 0, `partition ${p.number} starts 1 MiB aligned`);
  allClean(t, await fsck(disk, dir), 'after makeDisk');

  const m0 = await disk.manifest();
  t.ok(m0.files.length >= 40, `manifest lists the file set (${m0.files.length} files)`);
  t.same(m0.files, disk.initialFiles, 'manifest equals the files makeDisk wrote, checksums included');
  t.ok(m0.files.some((f) => f.path.includes('/')), 'some files are in nested directories');
  t.ok(new Set(m0.files.map((f) => f.partition)).size === 2, 'both volumes hold files');

  const h0 = await disk.hash();
  const report = await disk.mutate({ seed: 3 });
  t.ok(report.ops.length > 0 && report.bytes > 0, `mutate did something (${report.ops.length} ops, ${report.bytes} bytes)`);
  const m1 = await disk.manifest();
  checkAgainstOps(t, m0, m1, report.ops);
  const h1 = await disk.hash();
  t.not(h1, h0, 'mutate changed the disk hash');
  allClean(t, await fsck(disk, dir), 'after mutate');

  // Seedless rounds continue the disk's own generator: each differs from the last.
  let prev = m1;
  for (let i = 0; i < 3; i++) {
    const r = await disk.mutate({ create: 2, modify: 3, remove: 1, bytes: 512 * 1024 });
    const m = await disk.manifest();
    checkAgainstOps(t, prev, m, r.ops);
    prev = m;
  }

  // Writing the image behind the SimDisk's back (a restore onto the source) must be seen:
  // no cached copy of the NTFS partition may answer for the old bytes.
  const snap = join(dir, 'snap.img');
  t.equal((await sh('cp', ['--sparse=always', disk.path, snap])).code, 0);
  await disk.mutate({ seed: 99, partitions: [1], create: 3, remove: 2 });
  t.not(JSON.stringify(await disk.manifest()), JSON.stringify(prev), 'the NTFS volume changed');
  t.equal((await sh('cp', ['--sparse=always', snap, disk.path])).code, 0);
  await rm(snap);
  t.same(await disk.manifest(), prev, 'after the image is put back, the manifest is the old one');

  const before = await Promise.all(disk.volumes.map((p) => nonZeroFraction(disk, p)));
  const fill = await disk.fillFreeSpaceThenDelete({ seed: 5 });
  t.ok(fill.volumes.every((v) => v.bytes > 0), 'fill wrote garbage on every volume');
  t.same(await disk.manifest(), prev, 'fill + delete leaves every file as it was');
  t.not(await disk.hash(), h1, 'fill + delete changed the disk hash');
  const after = await Promise.all(disk.volumes.map((p) => nonZeroFraction(disk, p)));
  disk.volumes.forEach((p, i) => {
    // ext4 keeps its inode tables and journal zero: about 14 % of this 128 MiB volume.
    t.ok((after[i] as number) > 0.75, `partition ${p.number}: ${((after[i] as number) * 100).toFixed(0)}% non-zero after fill (was ${((before[i] as number) * 100).toFixed(0)}%)`);
  });
  allClean(t, await fsck(disk, dir), 'after fill');
  const verify = await sh('sfdisk', ['--verify', disk.path]);
  t.equal(verify.code, 0, 'the GPT (backup header included) is intact after all the writes', { output: verify.stdout + verify.stderr });
  t.match(verify.stdout, /No errors detected/);

  const again = await openDisk(disk.path, { tmpDir: scratch });
  t.same(again.layout, disk.layout, 'the layout is rediscovered from the image');
  await again.cleanup();

  await t.rejects(disk.damageExtMetadata(1), { code: 'DEVKIT_USAGE' }, 'damageExtMetadata refuses NTFS');
  await disk.damageExtMetadata(2);
  const damaged = await fsck(disk, dir);
  t.not(damaged[2]?.code, 0, 'e2fsck -fn fails after damageExtMetadata');
  t.equal(damaged[1]?.code, 0, 'the NTFS volume is untouched');

  await disk.cleanup();
  t.same(await ourMounts(root), [], 'nothing left mounted');
  t.same(await readdir(scratch), [], 'scratch files removed');
});

t.test('MBR disk with logical partitions: NTFS, ext4, ext4 (logical), FAT (logical)', async (t) => {
  const dir = await mkdtemp(join(root, 'mbr-'));
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 256 * MiB, scheme: 'mbr', logical: true, seed: 12, tmpDir: root });
  t.teardown(() => disk.cleanup());

  const table = await sfdiskParts(disk.path);
  t.equal(table.label, 'dos');
  const numbers = table.partitions.map((p) => Number(/(\d+)$/.exec(p.node)?.[1]));
  t.same(numbers, [1, 2, 3, 5, 6], 'two primaries, extended 3, logicals 5 and 6');
  const ext = table.partitions[2] as SfdiskPart;
  t.same(disk.layout.extended, { number: 3, offset: ext.start * 512, length: ext.size * 512 }, 'extended partition as sfdisk sees it');
  const data = table.partitions.filter((_, i) => i !== 2);
  t.same(
    data.map((p, i) => ({ number: numbers[i < 2 ? i : i + 1], offset: p.start * 512, length: p.size * 512, type: p.type })),
    disk.layout.partitions.map((p) => ({ number: p.number, offset: p.offset, length: p.length, type: p.type })),
    'data partitions are where layout says',
  );
  t.same(disk.layout.partitions.map((p) => [p.number, p.fs, p.logical]), [[1, 'ntfs', false], [2, 'ext4', false], [5, 'ext4', true], [6, 'fat', true]]);
  for (const p of disk.layout.partitions) {
    t.ok(p.offset >= ext.start * 512 || !p.logical, `partition ${p.number} is inside the extended one if logical`);
  }
  allClean(t, await fsck(disk, dir), 'after makeDisk');

  const m0 = await disk.manifest();
  t.same(m0.files, disk.initialFiles, 'manifest equals the files makeDisk wrote, on all four volumes');

  const report = await disk.mutate({ seed: 8, partitions: [5, 6], create: 4, modify: 4, remove: 3 });
  t.ok(report.ops.every((o) => o.partition === 5 || o.partition === 6), 'only the asked partitions changed');
  const m1 = await disk.manifest();
  checkAgainstOps(t, m0, m1, report.ops);
  t.same(m1.files.filter((f) => f.partition < 5), m0.files.filter((f) => f.partition < 5), 'primaries untouched');
  allClean(t, await fsck(disk, dir), 'after mutate');

  const h1 = await disk.hash();
  const fill = await disk.fillFreeSpaceThenDelete({ seed: 6 });
  t.same(fill.volumes.map((v) => v.partition), [1, 2, 5, 6]);
  t.same(await disk.manifest(), m1, 'fill + delete leaves every file as it was, FAT included');
  t.not(await disk.hash(), h1, 'and changes the disk hash');
  const fat = disk.partition(6);
  const fatFull = await nonZeroFraction(disk, fat);
  t.ok(fatFull > 0.8, `FAT partition ${(fatFull * 100).toFixed(0)}% non-zero after fill`);
  allClean(t, await fsck(disk, dir), 'after fill');
  t.match((await sh('sfdisk', ['--verify', disk.path])).stdout, /No errors detected/, 'the MBR and EBR chain are intact');

  const again = await openDisk(disk.path, { tmpDir: root });
  t.same(again.layout, disk.layout, 'the layout is rediscovered from the image');
  t.same(await again.manifest(), m1, 'and a second SimDisk reads the same files');
  await again.cleanup();

  await disk.cleanup();
  t.same(await ourMounts(root), [], 'nothing left mounted');
});

t.test('a seed reproduces the file set and the changes', async (t) => {
  const dir = await mkdtemp(join(root, 'seed-'));
  const volumes = [{ fs: 'ext4' as const, size: 24 * MiB, label: 'a' }, { fs: 'none' as const, size: 4 * MiB }, { fs: 'fat' as const, label: 'B' }];
  const make = (name: string, seed: number): Promise<SimDisk> => makeDisk({ path: join(dir, name), size: 64 * MiB, seed, volumes, tmpDir: root });
  const [a, b, c] = await Promise.all([make('a.img', 21), make('b.img', 21), make('c.img', 22)]);
  t.teardown(() => Promise.all([a, b, c].map((d) => d.cleanup())).then(() => undefined));
  t.same(a.layout.partitions.map((p) => [p.number, p.fs, p.label]), [[1, 'ext4', 'a'], [2, 'none', undefined], [3, 'fat', 'B']]);
  t.same(await a.manifest(), await b.manifest(), 'same seed, same files');
  t.not(JSON.stringify(await a.manifest()), JSON.stringify(await c.manifest()), 'another seed, other files');
  const ra = await a.mutate({ seed: 9 });
  const rb = await b.mutate({ seed: 9 });
  t.same(ra, rb, 'same round seed, same report');
  t.same(await a.manifest(), await b.manifest(), 'and the same files after it');
});

t.test('a round that asks for more than the free space skips writes instead of failing', async (t) => {
  const dir = await mkdtemp(join(root, 'full-'));
  const disk = await makeDisk({ path: join(dir, 'small.img'), size: 40 * MiB, seed: 3, tmpDir: root, volumes: [{ fs: 'ext4', size: 16 * MiB }, { fs: 'fat' }] });
  t.teardown(() => disk.cleanup());
  const r = await disk.mutate({ seed: 1, create: 6, modify: 2, remove: 0, bytes: 200 * MiB });
  t.ok(r.bytes < 40 * MiB, `wrote ${r.bytes} bytes, less than the disk holds`);
  allClean(t, await fsck(disk, dir), 'after an oversized round');
  const m = await disk.manifest();
  for (const op of r.ops) t.ok(m.files.some((f) => f.partition === op.partition && f.path === op.path), `${op.op} ${op.path} is on the disk`);
});

t.test('bad requests say what is wrong', async (t) => {
  const dir = await mkdtemp(join(root, 'bad-'));
  await t.rejects(makeDisk({ path: join(dir, 'x.img'), size: 100 * MiB + 1 }), { code: 'DEVKIT_USAGE' });
  await t.rejects(
    makeDisk({ path: join(dir, 'x.img'), size: 64 * MiB, volumes: [{ fs: 'ext4', size: 40 * MiB }, { fs: 'ext4', size: 40 * MiB }] }),
    { code: 'DEVKIT_USAGE', message: /more than the disk/ },
  );
  await t.rejects(makeDisk({ path: join(dir, 'x.img'), size: 64 * MiB, scheme: 'gpt', logical: true }), { code: 'DEVKIT_USAGE' });
  t.same(await ourMounts(root), []);
});

t.test('the command line rediscovers a disk made by another process', async (t) => {
  // The built CLI (scripts/test builds dist/ first): under tap's TypeScript loader each
  // process would spend seconds compiling.
  const cli = fileURLToPath(new URL('../dist/devkit/make-disk-cli.js', import.meta.url));
  const src = fileURLToPath(new URL('../src/devkit/make-disk-cli.ts', import.meta.url));
  const built = await stat(cli).catch(() => undefined);
  if (!built || built.mtimeMs < (await stat(src)).mtimeMs) {
    t.fail(`${cli} is missing or older than its source: run \`npm run build\` (scripts/test does)`);
    return;
  }
  const dir = await mkdtemp(join(root, 'cli-'));
  const node = (args: string[]): Promise<{ code: number; stdout: string; stderr: string }> => sh(process.execPath, [cli, ...args]);
  const path = join(dir, 'cli.img');
  const created = await node(['create', path, '--size', '48M', '--seed', '4', '--volume', 'ext4:20M:one', '--volume', 'ntfs::two']);
  t.equal(created.code, 0, 'create', { stderr: created.stderr });
  const before = await node(['manifest', path]);
  const mutated = await node(['mutate', path, '--seed', '2']);
  t.equal(mutated.code, 0, 'mutate', { stderr: mutated.stderr });
  const report = JSON.parse(mutated.stdout) as { ops: MutationOp[] };
  const after = await node(['manifest', path]);
  checkAgainstOps(t, JSON.parse(before.stdout) as Manifest, JSON.parse(after.stdout) as Manifest, report.ops);
  const layout = await node(['layout', path]);
  t.same((JSON.parse(layout.stdout) as { partitions: Partition[] }).partitions.map((p) => [p.number, p.fs, p.label]), [[1, 'ext4', 'one'], [2, 'ntfs', 'two']]);
  const bad = await node(['mutate', path]);
  t.equal(bad.code, 2, 'mutate without --seed is refused', { stderr: bad.stderr });
  const wrong = await node(['damage-ext', path, '--partition', '2']);
  t.equal(wrong.code, 2, 'damage-ext on NTFS is a usage error', { stderr: wrong.stderr });
  t.same(await ourMounts(root), []);
});
