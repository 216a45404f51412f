// Proves active-sector mode: free space full of garbage is not stored, a restored point passes fsck with every file intact, and a block that became free reads as zero.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, stat, writeFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { makeDisk, openDisk } from '../src/devkit/index.js';
import { imagekeep, prng, sha256File, tempDir } from './helpers/cli.js';

const run = promisify(execFile);
const MiB = 2 ** 20;

const BLOCK = 64 * 1024;

/** Offsets of the 64 KiB blocks of a file that hold exactly `template`. */
async function blocksHolding(path: string, template: Buffer): Promise<number[]> {
  const h = await open(path, 'r');
  const found: number[] = [];
  try {
    const size = (await h.stat()).size;
    const chunk = 16 * MiB;
    const buf = Buffer.alloc(chunk);
    for (let at = 0; at < size; at += chunk) {
      const { bytesRead } = await h.read(buf, 0, chunk, at);
      for (let o = 0; o + BLOCK <= bytesRead; o += BLOCK) if (buf.subarray(o, o + BLOCK).equals(template)) found.push(at + o);
    }
  } finally {
    await h.close();
  }
  return found;
}

/** How many of the 64 KiB blocks at `offsets` of a file hold exactly `want`. */
async function countHolding(path: string, offsets: number[], want: Buffer): Promise<number> {
  const h = await open(path, 'r');
  try {
    const buf = Buffer.alloc(BLOCK);
    let n = 0;
    for (const at of offsets) {
      const { bytesRead } = await h.read(buf, 0, BLOCK, at);
      if (bytesRead === BLOCK && buf.equals(want)) n++;
    }
    return n;
  } finally {
    await h.close();
  }
}

/** Copies one partition out of a disk image (ntfsfix takes no offset; e2fsck is given one). */
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
  const ntfsFile = join(dir, 'p-ntfs.img');
  await extract(restored, ntfs.offset, ntfs.length, ntfsFile);
  // e2fsprogs opens "file?offset=N" as the filesystem N bytes into the file: no copy needed.
  await t.resolves(run('e2fsck', ['-fn', `${restored}?offset=${ext.offset}`]), 'e2fsck -fn passes on the restored ext4');
  await t.resolves(run('ntfsfix', ['-n', ntfsFile]), 'ntfsfix -n passes on the restored NTFS');
  await rm(ntfsFile);
  // Mounted with fuse2fs and ntfs-3g (by the devkit), every file has its original checksum.
  const restoredManifest = await (await openDisk(restored, { tmpDir: dir })).manifest();
  t.same(restoredManifest.files, manifest.files, `all ${manifest.files.length} files identical after restore`);
  // The 64 KiB blocks that the marker fills in the base point (a 4 MiB file, 4 KiB aligned).
  const template = marker.subarray(0, BLOCK);
  const markerBlocks = await blocksHolding(restored, template);
  t.ok(markerBlocks.length >= 62, `${markerBlocks.length} blocks of the base point were all marker (4 MiB file, 4 KiB aligned)`);

  // The marker file is deleted and another file's content zeroed; their blocks must read as zero.
  await run('fuse2fs', ['-o', `offset=${ext.offset},rw`, disk.path, mnt]);
  await rm(join(mnt, 'marker.bin'));
  const h = await open(join(mnt, 'zeroed.bin'), 'r+');
  await h.write(Buffer.alloc(2 * MiB), 0, 2 * MiB, 0);
  await h.close();
  await run('umount', [mnt]);
  await new Promise((r) => setTimeout(r, 500));
  t.equal(await countHolding(disk.path, markerBlocks, template), markerBlocks.length, 'the freed marker bytes are still on the source disk, in each of those blocks');
  const inc = await imagekeep(['backup', disk.path, folder, '--at', '2026-06-01T01:00:00Z']);
  t.equal(inc.code, 0, inc.stderr);
  const point = join(dir, 'point1.raw');
  t.equal((await imagekeep(['export', join(folder, 'C_VOL-b001-i001.spi'), point])).code, 0);
  // Every 64 KiB block that the marker filled in the base point reads as zero now.
  t.equal(await countHolding(point, markerBlocks, Buffer.alloc(BLOCK)), markerBlocks.length, 'each of them reads as zero in the incremental point');
  // The incremental point's ext4, mounted read-only with fuse2fs: the zeroed file reads as
  // zeros and the deleted one is gone (the NTFS volume did not change since the base).
  await run('fuse2fs', ['-o', `offset=${ext.offset},ro`, point, mnt]);
  try {
    t.equal(await sha256File(join(mnt, 'zeroed.bin')), createHash('sha256').update(Buffer.alloc(2 * MiB)).digest('hex'), 'the zeroed file reads as zeros');
    t.notOk(await stat(join(mnt, 'marker.bin')).catch(() => null), 'the deleted file is gone');
  } finally {
    await run('umount', [mnt]);
  }
});
