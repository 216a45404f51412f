// Proves a grow-in-place session killed at each of its durable steps in turn (IMAGEKEEP_CRASH_AT=k) leaves a disk that opens, that qemu-img check accepts, and whose every written range reads either its old or its new content, as read by qemu-img.
import t from 'tap';
import { spawn } from 'node:child_process';
import { copyFile, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { planWrites } from '../src/devkit/disk-writes.js';
import { formats } from '../src/formats/drivers.js';
import { LocalFile } from '../src/formats/local-file.js';
import { localOpener } from '../src/formats/registry.js';
import { ROOT, tempDir } from './helpers/cli.js';
import { libyalCompare, qemuCheck, qemuChecks, qemuToRaw } from './helpers/disk-tools.js';

const CLI = join(ROOT, 'dist/devkit/grow-disk-cli.js');
const SIZE = 48 * 2 ** 20;
const SESSION = { seed: 7, count: 6, flushEvery: 3 };

const GROWABLE: [format: string, subformat: string][] = [
  ['vhd', 'dynamic'], ['vhdx', 'dynamic'], ['vmdk', 'monolithicSparse'], ['vmdk', 'vmfs'], ['qcow2', 'v3'],
];

function runSession(disk: string, env: Record<string, string>): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, disk, '--seed', String(SESSION.seed), '--count', String(SESSION.count), '--flush-every', String(SESSION.flushEvery)], {
      env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    p.stderr.on('data', (d) => (stderr += d));
    p.on('error', reject);
    p.on('close', (code, signal) => resolve({ code: code ?? (signal === 'SIGKILL' ? 137 : 128), stderr }));
  });
}

for (const [format, subformat] of GROWABLE) {
  t.test(`${format} ${subformat}`, async (t) => {
    const { dir, cleanup } = await tempDir(`crash-${format}-${subformat}`, '/dev/shm');
    t.teardown(cleanup);
    const driver = formats.get(format);
    // The disk before the session: created, with earlier writes in it. A vmfs descriptor
    // names its flat extent, so the disk keeps its name and is reset from pristine copies.
    const disk = join(dir, `disk.${format}`);
    const flat = (name: string) => name.replace(/\.vmdk$/, '-flat.vmdk');
    const opener = localOpener(dir);
    const w = await driver.create!(await LocalFile.open(disk, 'wx'), opener, { size: SIZE, subformat, finalName: `disk.${format}` });
    for (const p of planWrites(3, SIZE, 16)) await w.write(p.data, p.offset);
    await w.close();
    const pristine = join(dir, `pristine.${format}`);
    await copyFile(disk, pristine);
    if (subformat === 'vmfs') await copyFile(flat(disk), flat(pristine));
    const reset = async () => {
      await copyFile(pristine, disk);
      if (subformat === 'vmfs') await copyFile(flat(pristine), flat(disk));
    };
    const oldRaw = join(dir, 'old.raw');
    t.equal((await qemuToRaw(disk, format, oldRaw)).code, 0);
    const old = await readFile(oldRaw);
    const writes = planWrites(SESSION.seed, SIZE, SESSION.count);

    await reset();
    const trace = await runSession(disk, { IMAGEKEEP_CRASH_TRACE: '1' });
    t.equal(trace.code, 0, `the session runs to the end: ${trace.stderr.split('\n').filter((l) => !l.startsWith('durable step')).join(' ')}`);
    const steps = trace.stderr.split('\n').filter((l) => l.startsWith('durable step')).length;
    t.ok(steps >= SESSION.count, `${steps} durable steps`);

    let checked = 0;
    for (let k = 1; k <= steps; k++) {
      await reset();
      const r = await runSession(disk, { IMAGEKEEP_CRASH_AT: String(k) });
      if (r.code !== 137) {
        t.fail(`k=${k}: expected the injected SIGKILL, got exit ${r.code}: ${r.stderr}`);
        continue;
      }
      // Our reader opens it (repairing what the format allows), then the independent tools.
      const file = await LocalFile.open(disk, 'r+');
      const rw = await driver.openWritable!(file, opener);
      await rw.close();
      if (qemuChecks(format)) {
        const c = await qemuCheck(disk, format);
        // qcow2: clusters written but not yet referenced are leaks (3), never corruption (2).
        if (!(c.code === 0 || (format === 'qcow2' && c.code === 3))) t.fail(`k=${k}: qemu-img check exit ${c.code}: ${c.stdout} ${c.stderr}`);
      }
      const nowRaw = join(dir, 'now.raw');
      const conv = await qemuToRaw(disk, format, nowRaw);
      if (conv.code !== 0) {
        t.fail(`k=${k}: qemu-img cannot read the disk: ${conv.stderr}`);
        continue;
      }
      const now = await readFile(nowRaw);
      let bad = '';
      const covered = Buffer.from(old);
      for (const [i, wr] of writes.entries()) {
        const got = now.subarray(wr.offset, wr.offset + wr.data.length);
        const before = old.subarray(wr.offset, wr.offset + wr.data.length);
        if (!got.equals(wr.data) && !got.equals(before)) bad ||= `write ${i} (${wr.data.length} B at ${wr.offset}) reads neither old nor new`;
        covered.set(got, wr.offset);
      }
      if (!bad && !covered.equals(now)) bad = 'bytes outside the session\'s writes changed';
      if (bad) t.fail(`k=${k}: ${bad}`);
      if (format === 'vhd' && k % 5 === 0) {
        const y = await libyalCompare(disk, nowRaw);
        if (y.code !== 0) t.fail(`k=${k}: libvhdi reads it differently: ${y.stdout}`);
      }
      await rm(nowRaw);
      checked++;
    }
    t.equal(checked, steps, `every one of the ${steps} crash points checked`);
  });
}
