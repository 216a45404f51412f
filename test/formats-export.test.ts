// Proves `imagekeep export --format` writes every format and sub-format that qemu-img reads identically to the raw point, leaves only final names, and that `backup` reads each of them (and qemu-img's own disks) as a source.
import t from 'tap';
import { copyFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { WRITABLE_SUBFORMATS } from '../src/devkit/fuzz-seeds.js';
import { imagekeep, sha256File, tempDir } from './helpers/cli.js';
import { qemuCompare, qemuConvert, qemuInfo, qemuFormat } from './helpers/disk-tools.js';
import { makeRawDisk, scribble } from './helpers/rawdisk.js';

// A size that is a multiple of 512 but of no format's block size: the last chain block is partial too.
const SIZE = 64 * 2 ** 20 + 7 * 512;

t.test('export to every format, then back up from it', async (t) => {
  const { dir, cleanup } = await tempDir('export-formats');
  t.teardown(cleanup);
  const src = join(dir, 'disk.raw');
  await makeRawDisk(src, SIZE, 41, 3 * 2 ** 20);
  const folder = join(dir, 'folder');
  t.equal((await imagekeep(['backup', src, folder, '--forensic', '--at', '2026-01-05T10:00:00Z'])).code, 0, 'full');
  await scribble(src, 42, 20, 200_000);
  const inc = await imagekeep(['backup', src, folder, '--forensic', '--at', '2026-01-05T11:00:00Z', '--json']);
  t.equal(inc.code, 0, 'incremental');
  const image = (JSON.parse(inc.stdout) as { path: string }).path;
  const pointSha = await sha256File(src);

  const out = join(dir, 'out');
  await import('node:fs/promises').then((fs) => fs.mkdir(out));
  for (const [format, subformats] of Object.entries(WRITABLE_SUBFORMATS)) {
    for (const subformat of subformats) {
      await t.test(`${format} ${subformat}`, async (t) => {
        const disk = join(out, `${subformat}.${format}`);
        const args = ['export', image, disk, '--format', format, '--json'];
        if (subformat !== 'v3') args.push('--subformat', subformat);
        const r = await imagekeep(args);
        t.equal(r.code, 0, `export exits 0 ${r.stderr}`);
        const res = JSON.parse(r.stdout) as { files: string[]; format: string; subformat: string };
        t.equal(res.format, format);
        const cmp = await qemuCompare(src, disk, format);
        t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`);
        const info = await qemuInfo(disk, format);
        t.equal(info['virtual-size'], SIZE, 'qemu-img info: the point\'s size');
        t.equal(info.format, qemuFormat(format));
        const mtime = (await stat(disk)).mtime.toISOString();
        t.equal(mtime, '2026-01-05T11:00:00.000Z', 'mtime is the point time');

        // The exported disk as a backup source: probed, read, and restored byte-identically.
        const f2 = join(dir, `f-${format}-${subformat}`);
        const b = await imagekeep(['backup', disk, f2, '--forensic', '--json']);
        t.equal(b.code, 0, `backup from ${format} ${subformat}: ${b.stderr}`);
        const back = join(dir, `back-${format}-${subformat}.raw`);
        t.equal((await imagekeep(['export', (JSON.parse(b.stdout) as { path: string }).path, back])).code, 0);
        t.equal(await sha256File(back), pointSha, 'backup of the exported disk restores the point exactly');
      });
    }
  }
  const names = await readdir(out);
  t.notOk(names.some((n) => n.startsWith('.imagekeep-tmp-')), 'no temporary file is left');
  t.ok(names.includes('vmfs-flat.vmdk') && names.includes('monolithicFlat-flat.vmdk'), 'flat extents beside their descriptors');

  await t.test('refusals leave nothing behind', async (t) => {
    const again = await imagekeep(['export', image, join(out, 'dynamic.vhdx'), '--format', 'vhdx']);
    t.equal(again.code, 2, 'an existing output is refused');
    t.match(again.stderr, /exists; choose a new name or pass --force/);
    const azure = await imagekeep(['export', image, join(out, 'azure.vhd'), '--format', 'vhd', '--azure']);
    t.not(azure.code, 0, 'a size that is not a whole MiB is refused for Azure');
    t.equal(azure.stderr.trim().split('\n').length, 1, `one line: ${azure.stderr.trim()}`);
    t.match(azure.stderr, /MiB/);
    const bad = await imagekeep(['export', image, join(out, 'x.img'), '--format', 'vdi']);
    t.equal(bad.code, 2, 'an unknown format is a usage error');
    const after = await readdir(out);
    t.notOk(after.some((n) => n.startsWith('.imagekeep-tmp-') || n === 'azure.vhd' || n === 'x.img'), 'nothing written');
  });

  await t.test('backup reads disks made by qemu-img', async (t) => {
    for (const [format, opts] of [['vhdx', 'subformat=dynamic'], ['qcow2', 'compat=1.1'], ['vmdk', 'subformat=streamOptimized'], ['vhd', 'subformat=dynamic']] as const) {
      const disk = join(dir, `qemu.${format}`);
      const c = await qemuConvert(src, disk, format, opts);
      t.equal(c.code, 0, `qemu-img convert -O ${format}`);
      const f3 = join(dir, `fq-${format}`);
      const b = await imagekeep(['backup', disk, f3, '--forensic', '--json']);
      t.equal(b.code, 0, `backup from qemu's ${format}: ${b.stderr}`);
      const back = join(dir, `backq-${format}.raw`);
      t.equal((await imagekeep(['export', (JSON.parse(b.stdout) as { path: string }).path, back])).code, 0);
      // qemu's VHD rounds the size up to CHS geometry; compare what both hold.
      const ref = join(dir, `ref-${format}.raw`);
      await copyFile(src, ref);
      const cmp = await qemuCompare(ref, back, 'raw');
      t.equal(cmp.code, 0, `restored = source (${cmp.stdout.trim()})`);
    }
  });
});
