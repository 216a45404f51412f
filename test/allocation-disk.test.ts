// Proves findFreeRanges on whole disks: a GPT disk and an MBR disk (logical partition) holding NTFS and ext volumes get each volume's free space and nothing outside it; garbage over it leaves sgdisk, e2fsck, ntfsfix and every file content intact; overlapping partitions and a disk that is both partitioned and a bare ext volume claim nothing doubtful.
import t from 'tap';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { open, readFile, rm, writeFile } from 'node:fs/promises';
import { RawDevice } from '../src/formats/raw.js';
import { findFreeRanges, freeBlockMask, type AllocationReport } from '../src/formats/fs/allocation.js';
import { subtractRanges, totalLength } from '../src/formats/fs/ranges.js';
import type { ByteRange } from '../src/formats/types.js';
import {
  copySparse,
  dumpe2fsFree,
  fuseMount,
  garbageFill,
  hashTree,
  MemoryDevice,
  must,
  ntfsFreeBytes,
  pseudoRandom,
  run,
  standardTree,
  tempDir,
  writeTree,
} from './helpers/alloc-tools.js';

const { dir: work, cleanup } = await tempDir('disk');
t.teardown(cleanup);

const tree = standardTree(0.4);
const deleted = ['big/large.bin', 'dir1/sub/m1.bin', 'small/s3.bin'];
const src = join(work, 'src');
await writeTree(src, tree);
const expectedHashes = await hashTree(src, (rel) => deleted.includes(rel));

async function makeNtfsPart(name: string, size: string): Promise<string> {
  const image = join(work, name);
  await must('truncate', ['-s', size, image]);
  await must('mkntfs', ['-F', '-Q', '-q', '-c', '4096', image]);
  const m = await fuseMount('ntfs', image, join(work, `${name}-rw`), false);
  try {
    await writeTree(m.dir, tree);
    for (const p of deleted) await rm(join(m.dir, p));
  } finally {
    await m.unmount();
  }
  return image;
}

async function makeExtPart(name: string, size: string): Promise<string> {
  const image = join(work, name);
  await must('mkfs.ext4', ['-q', '-F', '-O', '^metadata_csum,^uninit_bg', '-d', src, image, size]);
  await must('debugfs', ['-w', '-f', '-', image], { input: deleted.map((p) => `rm /${p}`).join('\n') + '\n' });
  return image;
}

async function place(part: string, disk: string, offset: number): Promise<void> {
  await must('dd', [`if=${part}`, `of=${disk}`, 'bs=1M', `seek=${offset}`, 'oflag=seek_bytes', 'conv=notrunc,sparse', 'status=none']);
}

async function extract(disk: string, range: ByteRange, out: string): Promise<void> {
  await must('dd', [`if=${disk}`, `of=${out}`, 'bs=1M', `skip=${range.offset}`, `count=${range.length}`, 'iflag=skip_bytes,count_bytes', 'status=none']);
}

async function sfdiskParts(disk: string): Promise<{ start: number; size: number }[]> {
  const json = JSON.parse(await must('sfdisk', ['--json', disk])) as { partitiontable: { partitions: { start: number; size: number }[] } };
  return json.partitiontable.partitions;
}

async function report(image: string): Promise<AllocationReport> {
  const dev = await RawDevice.openPath(image);
  try {
    return await findFreeRanges(dev);
  } finally {
    await dev.close();
  }
}

const sha256 = async (p: string): Promise<string> => createHash('sha256').update(await readFile(p)).digest('hex');

t.test('GPT disk with NTFS, raw data and ext4 partitions', async (tt) => {
  const disk = join(work, 'gpt-disk.img');
  await must('truncate', ['-s', '216M', disk]);
  await must('sgdisk', ['-n1:2048:+96M', '-t1:0700', '-n2:0:+8M', '-t2:8300', '-n3:0:+96M', '-t3:8300', disk]);
  const parts = (await sfdiskParts(disk)).map((p) => ({ offset: p.start * 512, length: p.size * 512 }));
  const ntfs = await makeNtfsPart('p1-ntfs.img', '96M');
  const raw = join(work, 'p2-raw.img');
  await writeFile(raw, pseudoRandom('p2', 8 * 1024 * 1024));
  const ext = await makeExtPart('p3-ext.img', '96M');
  await place(ntfs, disk, parts[0].offset);
  await place(raw, disk, parts[1].offset);
  await place(ext, disk, parts[2].offset);

  const r = await report(disk);
  tt.equal(r.scheme, 'gpt');
  tt.match(r.volumes, [
    { partition: 1, offset: parts[0].offset, length: parts[0].length, fs: 'ntfs' },
    { partition: 2, offset: parts[1].offset, length: parts[1].length, fs: 'unknown', freeBytes: 0 },
    { partition: 3, offset: parts[2].offset, length: parts[2].length, fs: 'ext' },
  ]);
  tt.equal(r.volumes[0].freeBytes, await ntfsFreeBytes(ntfs), 'NTFS partition: free bytes equal ntfscluster -i on the partition file');
  const oracle = await dumpe2fsFree(ext);
  tt.equal(r.volumes[2].freeBytes, oracle.freeBlocks * oracle.blockSize, 'ext partition: free bytes equal dumpe2fs on the partition file');
  tt.equal(totalLength(r.free), r.volumes[0].freeBytes + r.volumes[2].freeBytes, 'free is the two volumes');
  tt.same(subtractRanges(r.free, [parts[0], parts[2]]), [], 'nothing outside the two filesystems');
  tt.ok(r.volumes.every((v) => v.note === undefined), 'no notes');
  const dev = await RawDevice.openPath(disk);
  const coarse = await findFreeRanges(dev, { minRunBytes: 65536 });
  await dev.close();
  tt.ok(coarse.free.every((x) => x.length >= 65536), 'minRunBytes drops short runs');
  tt.same(freeBlockMask(coarse.free, 216 * 2 ** 20, 65536), freeBlockMask(r.free, 216 * 2 ** 20, 65536), 'and loses no free 64 KiB block');
  tt.ok(freeBlockMask(r.free, 216 * 2 ** 20, 65536).some((x) => x === 1), 'some 64 KiB blocks are free');

  const copy = join(work, 'gpt-disk-garbage.img');
  await copySparse(disk, copy);
  await garbageFill(copy, r.free, 'disk');
  tt.match((await run('sgdisk', ['-v', copy])).stdout, /No problems found/, 'GPT untouched');
  const [p1, p2, p3] = ['g1.img', 'g2.img', 'g3.img'].map((n) => join(work, n));
  await extract(copy, parts[0], p1);
  await extract(copy, parts[1], p2);
  await extract(copy, parts[2], p3);
  tt.equal(await sha256(p2), await sha256(raw), 'unknown partition byte-identical');
  tt.equal((await run('ntfsfix', ['-n', p1])).code, 0, 'ntfsfix -n clean');
  tt.equal((await run('e2fsck', ['-fn', p3])).code, 0, 'e2fsck -fn clean');
  for (const [kind, image] of [['ntfs', p1], ['ext', p3]] as const) {
    const m = await fuseMount(kind, image, join(work, `${kind}-ro`), true);
    try {
      const got = await hashTree(m.dir, (rel) => rel === 'lost+found');
      tt.same([...got.entries()].sort(), [...expectedHashes.entries()].sort(), `${kind}: every file reads back with its original sha256`);
    } finally {
      await m.unmount();
    }
  }
});

t.test('MBR disk with NTFS in a primary and ext4 in a logical partition', async (tt) => {
  const disk = join(work, 'mbr-disk.img');
  await must('truncate', ['-s', '100M', disk]);
  await must('sfdisk', ['-q', '--wipe', 'never', disk], { input: 'label: dos\nstart=2048,size=40M,type=7\ntype=5\nsize=48M,type=83\n' });
  const parts = await sfdiskParts(disk); // p1, p2 (extended), p5
  const p1 = { offset: parts[0].start * 512, length: parts[0].size * 512 };
  const p5 = { offset: parts[2].start * 512, length: parts[2].size * 512 };
  const ntfs = await makeNtfsPart('m1-ntfs.img', '40M');
  const ext = await makeExtPart('m5-ext.img', '48M');
  await place(ntfs, disk, p1.offset);
  await place(ext, disk, p5.offset);

  const r = await report(disk);
  tt.equal(r.scheme, 'mbr');
  tt.match(r.volumes, [
    { partition: 1, fs: 'ntfs', freeBytes: await ntfsFreeBytes(ntfs) },
    { partition: 5, offset: p5.offset, fs: 'ext' },
  ]);
  tt.equal(r.volumes.length, 2, 'the extended container itself is not probed');
  const oracle = await dumpe2fsFree(ext);
  tt.equal(r.volumes[1].freeBytes, oracle.freeBlocks * oracle.blockSize);
  tt.same(subtractRanges(r.free, [p1, p5]), [], 'nothing outside the two filesystems');

  const copy = join(work, 'mbr-disk-garbage.img');
  await copySparse(disk, copy);
  await garbageFill(copy, r.free, 'mbr');
  const layout = (ps: { start: number; size: number }[]) => ps.map((p) => [p.start, p.size]);
  tt.same(layout(await sfdiskParts(copy)), layout(parts), 'partition table and EBR untouched');
  await extract(copy, p1, join(work, 'mg1.img'));
  await extract(copy, p5, join(work, 'mg5.img'));
  tt.equal((await run('ntfsfix', ['-n', join(work, 'mg1.img')])).code, 0, 'ntfsfix -n clean');
  tt.equal((await run('e2fsck', ['-fn', join(work, 'mg5.img')])).code, 0, 'e2fsck -fn clean');

  // Fuzz: flip bytes in the tables and filesystem metadata. Whatever the bytes say, the
  // answer comes quickly, without throwing, and claims nothing outside the partitions.
  const pristine = await readFile(disk);
  const hot: number[] = [0, ...[p1.offset, p5.offset - 2048 * 512, p5.offset].flatMap((o) => [o, o + 1024, o + 4096])];
  const ntfsMft = p1.offset + pristine.readUInt32LE(p1.offset + 0x30) * 4096;
  hot.push(ntfsMft, ntfsMft + 3 * 1024, ntfsMft + 6 * 1024);
  let seed = 12345;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  const started = Date.now();
  let failures = 0;
  const bytes = Uint8Array.from(pristine);
  let slowest = 0;
  for (let round = 0; round < 300; round++) {
    const touched: number[] = [];
    for (let k = 0; k < 1 + rand(4); k++) {
      const at = hot[rand(hot.length)] + rand(1024);
      touched.push(at);
      bytes[at] = rand(256);
    }
    const dev = new MemoryDevice(bytes);
    const t0 = Date.now();
    try {
      const fuzzed = await findFreeRanges(dev);
      if (subtractRanges(fuzzed.free, [p1, p5]).length > 0 && fuzzed.volumes.every((v) => v.partition === 1 || v.partition === 5)) {
        failures++;
        tt.fail(`round ${round}: free space outside the partitions`);
      }
    } catch (err) {
      failures++;
      tt.fail(`round ${round}: threw ${String(err)}`);
    }
    slowest = Math.max(slowest, Date.now() - t0);
    for (const at of touched) bytes[at] = pristine[at];
  }
  tt.comment(`slowest fuzzed round: ${slowest} ms`);
  tt.equal(failures, 0, '300 fuzzed disks: no throw, nothing outside the partitions');
  tt.ok(Date.now() - started < 20000, `fuzzing took ${Date.now() - started} ms`);
});

t.test('overlapping partitions: the overlap is never free', async (tt) => {
  const ext = await makeExtPart('ov-ext.img', '32M');
  const disk = join(work, 'overlap.img');
  await must('truncate', ['-s', '48M', disk]);
  await must('sfdisk', ['-q', '--wipe', 'never', disk], { input: 'label: dos\nstart=2048,size=32M,type=83\n' });
  await place(ext, disk, 1024 * 1024);
  // Slot 2 claims the second half of p1 (sfdisk would refuse to write this).
  const entry = Buffer.alloc(16);
  entry[4] = 0x83;
  entry.writeUInt32LE(2048 + 32768, 8);
  entry.writeUInt32LE(16384, 12);
  const fh = await open(disk, 'r+');
  await fh.write(entry, 0, 16, 446 + 16);
  await fh.close();
  const p2 = { offset: (2048 + 32768) * 512, length: 16384 * 512 };

  const alone = await report(ext);
  const r = await report(disk);
  tt.match(r.volumes, [{ partition: 1, fs: 'ext', note: /overlaps another partition/ }, { partition: 2 }]);
  const shifted = alone.free.map((x) => ({ offset: x.offset + 1024 * 1024, length: x.length }));
  tt.same(r.free, subtractRanges(shifted, [p2]), 'p1 free space minus the part p2 also claims');
  tt.ok(r.free.length > 0, 'the rest of p1 still counts');
});

t.test('a disk that is both partitioned and a bare ext volume claims nothing', async (tt) => {
  const image = join(work, 'ambiguous.img');
  await must('mkfs.ext4', ['-q', '-F', '-O', '^metadata_csum,^uninit_bg', image, '40M']);
  // An MBR written over the ext boot block: the table and the filesystem now both look valid.
  await must('sfdisk', ['-q', '--wipe', 'never', image], { input: 'label: dos\nstart=2048,size=16M,type=83\n' });
  tt.equal((await run('e2fsck', ['-fn', image])).code, 0, 'the bare ext volume checks clean under the MBR');
  // Then a filesystem made in p1 (as after repartitioning): the old superblock at offset 0 stays.
  await must('mkfs.ext4', ['-q', '-F', '-O', '^metadata_csum,^uninit_bg', join(work, 'inner.img'), '16M']);
  await place(join(work, 'inner.img'), image, 1024 * 1024);
  const r = await report(image);
  tt.equal(r.scheme, 'mbr');
  tt.same(r.free, []);
  tt.match(r.volumes, [{ partition: 1, fs: 'ext', freeBytes: 0, note: /ext superblock at offset 0/ }]);
});
