// Proves ext2/3/4 free ranges (1/2/4 KiB blocks, 32/64-bit descriptors, flex_bg) equal dumpe2fs's, and that filling them with garbage keeps e2fsck -fn clean and every file intact; refused and corrupt filesystems claim nothing.
import t, { type Test } from 'tap';
import { join } from 'node:path';
import { open, truncate, writeFile } from 'node:fs/promises';
import { RawDevice } from '../src/formats/raw.js';
import { findFreeRanges } from '../src/formats/fs/allocation.js';
import { extRefusal, parseExtSuperblock, readExtAllocation } from '../src/formats/fs/ext.js';
import { CorruptFilesystemError, UnsupportedFilesystemError } from '../src/formats/fs/errors.js';
import { normalizeRanges, subtractRanges, totalLength } from '../src/formats/fs/ranges.js';
import {
  blockRunsToRanges,
  copySparse,
  dumpe2fsFree,
  fuseMount,
  garbageFill,
  hashTree,
  must,
  run,
  standardTree,
  tempDir,
  writeTree,
} from './helpers/alloc-tools.js';

const { dir: work, cleanup } = await tempDir('ext');
t.teardown(cleanup);

const tree = standardTree(0.5);
const deleted = ['big/large.bin', 'dir1/sub/m1.bin', 'dir2/sub/m5.bin', 'small/s3.bin', 'small/s17.bin'];
const src = join(work, 'src');
await writeTree(src, tree);
const expectedHashes = await hashTree(src, (rel) => deleted.includes(rel));

interface Made {
  image: string;
  size: number;
}

/** mkfs with the tree, then files deleted through debugfs (frees blocks the way the kernel would). */
async function makeExt(name: string, mkfs: string, args: string[], size: string): Promise<Made> {
  const image = join(work, `${name}.img`);
  await must(mkfs, ['-q', '-F', ...args, '-d', src, image, size]);
  await must('debugfs', ['-w', '-f', '-', image], { input: deleted.map((p) => `rm /${p}`).join('\n') + '\n' });
  const fsck = await run('e2fsck', ['-fn', image]);
  if (fsck.code !== 0) throw new Error(`fixture ${name} is not clean before the test: ${fsck.stdout}`);
  const dev = await RawDevice.openPath(image);
  const s = dev.size;
  await dev.close();
  return { image, size: s };
}

async function allocation(image: string) {
  const dev = await RawDevice.openPath(image);
  try {
    return await findFreeRanges(dev);
  } finally {
    await dev.close();
  }
}

/** Garbage over every free range of a copy; e2fsck -fn must pass and every kept file read back unchanged. */
async function garbageOracle(tt: Test, name: string, image: string): Promise<void> {
  const report = await allocation(image);
  const copy = join(work, `${name}-garbage.img`);
  await copySparse(image, copy);
  const written = await garbageFill(copy, report.free, name);
  tt.equal(written, report.volumes[0].freeBytes, 'garbage written over all claimed free bytes');
  const fsck = await run('e2fsck', ['-fn', copy]);
  tt.equal(fsck.code, 0, `e2fsck -fn clean after garbage: ${fsck.stdout.split('\n').slice(-4).join(' | ')}`);
  const m = await fuseMount('ext', copy, join(work, `${name}-mnt`), true);
  try {
    const got = await hashTree(m.dir, (rel) => rel === 'lost+found');
    tt.same([...got.entries()].sort(), [...expectedHashes.entries()].sort(), 'every file reads back with its original sha256');
  } finally {
    await m.unmount();
  }
}

const variants: { name: string; mkfs: string; args: string[]; size: string; exact: boolean; blockSize: number }[] = [
  { name: 'ext4-4k-64bit', mkfs: 'mkfs.ext4', args: ['-b', '4096', '-g', '4096', '-O', '64bit,^metadata_csum,^uninit_bg'], size: '96M', exact: true, blockSize: 4096 },
  { name: 'ext4-4k-default', mkfs: 'mkfs.ext4', args: ['-b', '4096', '-g', '4096', '-O', '64bit'], size: '96M', exact: false, blockSize: 4096 },
  { name: 'ext4-1k', mkfs: 'mkfs.ext4', args: ['-b', '1024', '-O', '^metadata_csum,^uninit_bg,^64bit'], size: '64M', exact: true, blockSize: 1024 },
  { name: 'ext4-1k-default', mkfs: 'mkfs.ext4', args: ['-b', '1024'], size: '64M', exact: false, blockSize: 1024 },
  { name: 'ext3-2k', mkfs: 'mkfs.ext3', args: ['-b', '2048'], size: '64M', exact: true, blockSize: 2048 },
  { name: 'ext2-1k', mkfs: 'mkfs.ext2', args: ['-b', '1024'], size: '48M', exact: true, blockSize: 1024 },
];

for (const v of variants) {
  t.test(v.name, async (tt) => {
    const { image, size } = await makeExt(v.name, v.mkfs, v.args, v.size);
    const oracle = await dumpe2fsFree(image);
    tt.equal(oracle.blockSize, v.blockSize, 'block size as asked');
    const report = await allocation(image);
    tt.equal(report.scheme, 'none');
    tt.equal(report.volumes.length, 1);
    const vol = report.volumes[0];
    tt.match(vol, { offset: 0, length: size, fs: 'ext' });
    const theirs = normalizeRanges(blockRunsToRanges(oracle.runs, oracle.blockSize));
    tt.equal(subtractRanges(report.free, theirs).length, 0, 'every range we call free dumpe2fs calls free');
    if (v.exact) tt.equal(oracle.uninitGroups, 0, 'no BLOCK_UNINIT groups in the exact variant');
    else tt.ok(oracle.uninitGroups > 0, `${oracle.uninitGroups} BLOCK_UNINIT groups, whose free blocks follow from their metadata`);
    tt.equal(vol.freeBytes, oracle.freeBlocks * oracle.blockSize, 'free bytes equal dumpe2fs -h Free blocks');
    tt.same(report.free, theirs, 'free ranges equal dumpe2fs per-group Free blocks, range for range');
    tt.notOk(vol.note, 'no note');
    tt.equal(totalLength(report.free), vol.freeBytes, 'report total matches the ranges');
    await garbageOracle(tt, v.name, image);
  });
}

t.test('refused and corrupt ext filesystems claim nothing', async (tt) => {
  const base = (await makeExt('bad-base', 'mkfs.ext4', ['-b', '1024', '-O', '^metadata_csum,^uninit_bg,^64bit'], '24M')).image;
  const variant = async (name: string, debugfsCmd: string | undefined): Promise<string> => {
    const image = join(work, `${name}.img`);
    await copySparse(base, image);
    if (debugfsCmd) await must('debugfs', ['-w', '-R', debugfsCmd, image]);
    return image;
  };
  const expectNote = async (image: string, pattern: RegExp, errorClass: typeof CorruptFilesystemError | typeof UnsupportedFilesystemError) => {
    const report = await allocation(image);
    tt.equal(report.free.length, 0, `${pattern}: no free ranges`);
    tt.equal(report.volumes[0].fs, 'ext');
    tt.equal(report.volumes[0].freeBytes, 0);
    tt.match(report.volumes[0].note, pattern, `${pattern}: noted`);
    const dev = await RawDevice.openPath(image);
    try {
      await tt.rejects(readExtAllocation(dev, { offset: 0, length: dev.size }), errorClass, `${pattern}: typed error`);
    } finally {
      await dev.close();
    }
  };

  await expectNote(await variant('recover', 'feature needs_recovery'), /journal needs recovery/, UnsupportedFilesystemError);
  await expectNote(await variant('unclean', 'ssv state 0'), /not cleanly unmounted/, UnsupportedFilesystemError);
  await expectNote(await variant('errors', 'ssv state 3'), /recorded errors/, UnsupportedFilesystemError);
  await expectNote(await variant('bitmap-past-end', 'set_bg 1 block_bitmap 9999999'), /block bitmap of group 1 is block 9999999/, CorruptFilesystemError);

  const metaBg = join(work, 'meta_bg.img');
  await must('mkfs.ext4', ['-q', '-F', '-O', 'meta_bg,^resize_inode', metaBg, '24M']);
  await expectNote(metaBg, /incompat features we do not read: meta_bg/, UnsupportedFilesystemError);

  const bigalloc = join(work, 'bigalloc.img');
  await must('mkfs.ext4', ['-q', '-F', '-O', 'bigalloc', '-C', '16384', bigalloc, '64M']);
  await expectNote(bigalloc, /bigalloc/, UnsupportedFilesystemError);

  // The filesystem says it is bigger than the device holding it (a truncated copy).
  const truncated = await variant('truncated', undefined);
  await truncate(truncated, 16 * 1024 * 1024);
  await expectNote(truncated, /do not fit the volume/, CorruptFilesystemError);

  // A superblock cut off mid-way: the magic is there, the rest is not.
  const stub = join(work, 'stub.img');
  const head = Buffer.alloc(1100);
  const fh = await open(base, 'r');
  await fh.read(head, 0, 1100, 0);
  await fh.close();
  await writeFile(stub, head);
  await expectNote(stub, /ext superblock: bytes 1024\.\.2048 lie outside the volume of 1100 bytes/, CorruptFilesystemError);

  // One group's descriptor disagrees with its bitmap: that group is counted as in use, the rest still count.
  const mismatch = await variant('mismatch', 'set_bg 2 free_blocks_count 7');
  const good = await allocation(base);
  const report = await allocation(mismatch);
  tt.match(report.volumes[0].note, /group 2 \(bitmap \d+, descriptor 7\)/, 'mismatched group noted');
  const groupBytes = 8192 * 1024;
  const group2 = { offset: 1024 + 2 * groupBytes, length: groupBytes };
  tt.same(report.free, subtractRanges(good.free, [group2]), 'exactly group 2 dropped');
});

t.test('pure parser: superblock geometry checks', async (tt) => {
  const sb = (edit: (dv: DataView) => void): Uint8Array => {
    const b = new Uint8Array(1024);
    const dv = new DataView(b.buffer);
    dv.setUint32(4, 65536, true); // blocks
    dv.setUint32(20, 0, true); // first data block
    dv.setUint32(24, 2, true); // 4 KiB
    dv.setUint32(32, 32768, true); // blocks per group
    dv.setUint16(56, 0xef53, true);
    dv.setUint16(58, 1, true);
    dv.setUint32(76, 1, true);
    edit(dv);
    return b;
  };
  tt.match(parseExtSuperblock(sb(() => {})), { blockSize: 4096, blocksCount: 65536, groupCount: 2, descSize: 32 });
  tt.match(
    parseExtSuperblock(sb((dv) => {
      dv.setUint32(96, 0x80, true);
      dv.setUint32(0x150, 1, true);
      dv.setUint16(0xfe, 64, true);
    })),
    { blocksCount: 2 ** 32 + 65536, descSize: 64, groupCount: (2 ** 32 + 65536) / 32768 },
    '64bit: high word of the block count and s_desc_size',
  );
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint16(56, 0x1234, true))), { message: /expected magic 0xef53, found 0x1234/ });
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint32(24, 7, true))), { message: /above 64 KiB/ });
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint32(32, 32769, true))), { message: /s_blocks_per_group 32769/ });
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint32(32, 65536, true))), { message: /not in 8\.\.32768/ });
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint32(20, 1, true))), { message: /s_first_data_block is 1, expected 0/ });
  tt.throws(() => parseExtSuperblock(sb((dv) => dv.setUint32(4, 0, true))), { message: /leaves no block/ });
  tt.throws(
    () => parseExtSuperblock(sb((dv) => { dv.setUint32(96, 0x80, true); dv.setUint16(0xfe, 48, true); })),
    { message: /s_desc_size 48/ },
  );
  tt.throws(() => parseExtSuperblock(new Uint8Array(1000)), CorruptFilesystemError);
  tt.match(extRefusal(parseExtSuperblock(sb((dv) => dv.setUint32(96, 0x80000000, true)))), /incompat features we do not read: 0x80000000/);
  tt.equal(extRefusal(parseExtSuperblock(sb((dv) => dv.setUint32(96, 0x242, true)))), undefined, 'filetype, extents, flex_bg understood');
});
