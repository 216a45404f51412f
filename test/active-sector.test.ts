// Proves active-sector mode: free space full of garbage is not stored, a restored point passes fsck with every file intact, and a block that became free reads as zero.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, open, stat, writeFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { makeDisk, openDisk } from '../src/devkit/index.js';
import { imagekeep, prng, tempDir } from './helpers/cli.js';

const run = promisify(execFile);
const MiB = 2 ** 20;

async function countPattern(path: string, pattern: Buffer): Promise<number> {
  let n = 0;
  let tail = Buffer.alloc(0);
  for await (const chunk of createReadStream(path, { highWaterMark: 8 * MiB })) {
    const buf = Buffer.concat([tail, chunk as Buffer]);
    for (let at = buf.indexOf(pattern); at >= 0; at = buf.indexOf(pattern, at + 1)) n++;
    tail = buf.subarray(buf.length - pattern.length + 1);
  }
  return n;
}

/** Blocks that hold exactly `template` in `before`, and how many of those are all zero in `after`. */
async function freedBlocks(before: string, after: string, template: Buffer): Promise<{ full: number; zeroNow: number }> {
  const a = await open(before, 'r');
  const b = await open(after, 'r');
  const size = (await a.stat()).size;
  const chunk = 16 * MiB;
  const x = Buffer.alloc(chunk);
  const y = Buffer.alloc(chunk);
  const zero = Buffer.alloc(template.length);
  let full = 0;
  let zeroNow = 0;
  for (let at = 0; at < size; at += chunk) {
    await a.read(x, 0, chunk, at);
    await b.read(y, 0, chunk, at);
    for (let o = 0; o < chunk; o += template.length) {
      if (x.subarray(o, o + template.length).equals(template)) {
        full++;
        if (y.subarray(o, o + template.length).equals(zero)) zeroNow++;
      }
    }
  }
  await a.close();
  await b.close();
  return { full, zeroNow };
}

/** Copies one partition out of a disk image (fsck tools take a file). */
async function extract(disk: string, offset: number, length: number, out: string): Promise<void> {
  await run('dd', [`if=${disk}`, `of=${out}`, 'bs=1M', `skip=${offset / MiB}`, `count=${length / MiB}`, 'conv=sparse', 'status=none']);
}

t.test('active sector on a 4 GiB disk', async (t) => {
  const { dir, cleanup } = await tempDir('active');
  t.teardown(cleanup);
  const disk = await makeDisk({ path: join(dir, 'disk.img'), size: 4 * 2 ** 30, seed: 9, bytes: 130 * MiB, tmpDir: dir });
  t.teardown(() => disk.cleanup());
  await disk.fillFreeSpaceThenDelete();
  const ext = disk.layout.partitions.find((p) => p.fs === 'ext4')!;
  const ntfs = disk.layout.partitions.find((p) => p.fs === 'ntfs')!;

  // A file whose bytes we can find again, to be deleted before the incremental.
  const pattern = Buffer.from('imagekeep-freed-block-pattern-0123456789abcdef');
  const marker = Buffer.alloc(4 * MiB);
  for (let at = 0; at < marker.length; at += 64) pattern.copy(marker, at);
  const mnt = join(dir, 'mnt');
  await mkdir(mnt);
  await run('fuse2fs', ['-o', `offset=${ext.offset},rw`, disk.path, mnt]);
  await writeFile(join(mnt, 'marker.bin'), marker);
  await writeFile(join(mnt, 'zeroed.bin'), prng(77)(2 * MiB));
  await writeFile(join(mnt, 'bulk.bin'), prng(78)(40 * MiB));
  await run('umount', [mnt]);
  await new Promise((r) => setTimeout(r, 500)); // fuse2fs flushes after umount returns
  const manifest = await disk.manifest();
  const fileBytes = manifest.files.reduce((s, f) => s + f.size, 0);
  t.ok(fileBytes >= 200 * MiB, `the disk holds ${Math.round(fileBytes / MiB)} MiB of files`);

  const folder = join(dir, 'backups');
  const full = await imagekeep(['backup', disk.path, folder, '--compress', 'none', '--at', '2026-06-01T00:00:00Z', '--json']);
  t.equal(full.code, 0, full.stderr);
  const base = join(folder, 'C_VOL-b001.spf');
  const baseSize = (await stat(base)).size;
  t.ok(baseSize < 250 * MiB, `base is ${Math.round(baseSize / MiB)} MiB with --compress none (< 250 MiB)`);

  const restored = join(dir, 'restored.img');
  const rr = await imagekeep(['restore', base, restored]);
  t.equal(rr.code, 0, rr.stderr);
  const extFile = join(dir, 'p-ext.img');
  const ntfsFile = join(dir, 'p-ntfs.img');
  await extract(restored, ext.offset, ext.length, extFile);
  await extract(restored, ntfs.offset, ntfs.length, ntfsFile);
  await t.resolves(run('e2fsck', ['-fn', extFile]), 'e2fsck -fn passes on the restored ext4');
  await t.resolves(run('ntfsfix', ['-n', ntfsFile]), 'ntfsfix -n passes on the restored NTFS');
  await rm(extFile);
  await rm(ntfsFile);
  // Mounted with fuse2fs and ntfs-3g (by the devkit), every file has its original checksum.
  const restoredManifest = await (await openDisk(restored, { tmpDir: dir })).manifest();
  t.same(restoredManifest.files, manifest.files, `all ${manifest.files.length} files identical after restore`);

  // The marker file is deleted and another file's content zeroed; their blocks must read as zero.
  await run('fuse2fs', ['-o', `offset=${ext.offset},rw`, disk.path, mnt]);
  await rm(join(mnt, 'marker.bin'));
  const h = await open(join(mnt, 'zeroed.bin'), 'r+');
  await h.write(Buffer.alloc(2 * MiB), 0, 2 * MiB, 0);
  await h.close();
  await run('umount', [mnt]);
  await new Promise((r) => setTimeout(r, 500));
  t.ok(await countPattern(disk.path, pattern) > 0, 'the freed marker bytes are still on the source disk');
  const inc = await imagekeep(['backup', disk.path, folder, '--at', '2026-06-01T01:00:00Z']);
  t.equal(inc.code, 0, inc.stderr);
  const point = join(dir, 'point1.raw');
  t.equal((await imagekeep(['export', join(folder, 'C_VOL-b001-i001.spi'), point])).code, 0);
  // Every 64 KiB block that the marker filled in the base point reads as zero now.
  const template = marker.subarray(0, 64 * 1024);
  const freed = await freedBlocks(join(dir, 'restored.img'), point, template);
  t.ok(freed.full >= 62, `${freed.full} blocks of the base point were all marker (4 MiB file, 4 KiB aligned)`);
  t.equal(freed.zeroNow, freed.full, 'each of them reads as zero in the incremental point');
  const after = await (await openDisk(point, { tmpDir: dir })).manifest();
  t.same(after.files.find((f) => f.path.endsWith('zeroed.bin'))?.sha256,
    (await import('node:crypto')).createHash('sha256').update(Buffer.alloc(2 * MiB)).digest('hex'), 'the zeroed file reads as zeros');
  t.notOk(after.files.some((f) => f.path.endsWith('marker.bin')), 'the deleted file is gone');
});
