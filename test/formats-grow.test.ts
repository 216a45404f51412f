// Proves every growable disk (VHD dynamic, VHDX, VMDK sparse and vmfs, qcow2) takes random writes into allocated and unallocated space over several sessions, through a local file and through SFTP to a real OpenSSH server, and then reads in qemu-img exactly as a raw file given the same writes.
import t, { type Test } from 'tap';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { planWrites } from '../src/devkit/disk-writes.js';
import type { FileOpener } from '../src/formats/disk-image.js';
import { formats } from '../src/formats/drivers.js';
import { localOpener } from '../src/formats/registry.js';
import { SshConnection } from '../src/formats/ssh/connection.js';
import { sftpOpener } from '../src/formats/ssh/opener.js';
import { tempDir } from './helpers/cli.js';
import { qemuCheck, qemuChecks, qemuCompare } from './helpers/disk-tools.js';
import { startSshd } from './helpers/sshd.js';

const SIZE = 40 * 2 ** 20 + 3 * 512;
const GROWABLE: [format: string, subformat: string][] = [
  ['vhd', 'dynamic'], ['vhdx', 'dynamic'], ['vmdk', 'monolithicSparse'], ['vmdk', 'vmfs'], ['qcow2', 'v3'],
];

async function growAndCompare(t: Test, dir: string, name: string, format: string, subformat: string, opener: FileOpener): Promise<void> {
  const driver = formats.get(format);
  const mirrorPath = join(dir, `${name}.raw`);
  const mirror = await open(mirrorPath, 'w');
  await mirror.truncate(SIZE);
  const created = await driver.create!(await opener(name, 'wx'), opener, { size: SIZE, subformat, finalName: name });
  await created.close();
  // Three sessions; later ones overwrite earlier writes (allocated space) and add new ones.
  for (const [session, seed] of [101, 102, 101].entries()) {
    const w = await driver.openWritable!(await opener(name, 'r+'), opener);
    const writes = planWrites(seed + session * 1000, SIZE, 24);
    for (const [i, p] of writes.entries()) {
      await w.write(p.data, p.offset);
      await mirror.write(p.data, 0, p.data.length, p.offset);
      if (i === 11) await w.flush();
    }
    // The writer reads its own writes back, pending metadata included.
    const probe = writes[writes.length - 1]!;
    const back = Buffer.alloc(probe.data.length);
    await w.read(back, probe.offset);
    t.ok(back.equals(probe.data), `session ${session}: read-back through the writer`);
    await w.close();
  }
  await mirror.close();
  const disk = join(dir, name);
  const cmp = await qemuCompare(mirrorPath, disk, format);
  t.equal(cmp.code, 0, `qemu-img compare with the raw mirror: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`);
  if (qemuChecks(format)) {
    const c = await qemuCheck(disk, format);
    t.equal(c.code, 0, `qemu-img check clean ${c.stdout.trim()}`);
  }
  const file = await opener(name, 'r');
  const report = await driver.check(file, opener).finally(() => file.close());
  t.same(report.problems, [], 'our structure check is clean');
}

t.test('through a local file', async (t) => {
  const { dir, cleanup } = await tempDir('grow-local');
  t.teardown(cleanup);
  for (const [format, subformat] of GROWABLE) {
    await t.test(`${format} ${subformat}`, (t) => growAndCompare(t, dir, `local-${subformat}.${format}`, format, subformat, localOpener(dir)));
  }
});

t.test('through SFTP to OpenSSH on 127.0.0.1', async (t) => {
  const sshd = await startSshd();
  t.teardown(() => sshd.stop());
  const { dir, cleanup } = await tempDir('grow-sftp');
  t.teardown(cleanup);
  const conn = await SshConnection.connect(sshd.connectOptions());
  t.teardown(() => conn.close());
  for (const [format, subformat] of GROWABLE) {
    await t.test(`${format} ${subformat}`, (t) => growAndCompare(t, dir, `sftp-${subformat}.${format}`, format, subformat, sftpOpener(conn, dir)));
  }
});
