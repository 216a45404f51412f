// Proves NTFS free ranges (512 B to 128 KiB clusters) match libntfs-3g's free count, and that filling them with garbage keeps ntfsfix -n clean and every file intact through ntfs-3g; corrupt or dirty volumes claim nothing.
import t from 'tap';
import { join } from 'node:path';
import { open, rm, truncate, writeFile } from 'node:fs/promises';
import { RawDevice } from '../src/formats/raw.js';
import { findFreeRanges } from '../src/formats/fs/allocation.js';
import { applyFixups, decodeRunlist, parseNtfsBootSector, readNtfsAllocation } from '../src/formats/fs/ntfs.js';
import { CorruptFilesystemError, UnsupportedFilesystemError } from '../src/formats/fs/errors.js';
import { totalLength } from '../src/formats/fs/ranges.js';
import {
  copySparse,
  fuseMount,
  garbageFill,
  hashTree,
  must,
  ntfsFreeBytes,
  run,
  standardTree,
  tempDir,
  writeTree,
} from './helpers/alloc-tools.js';

const { dir: work, cleanup } = await tempDir('ntfs');
t.teardown(cleanup);

const tree = standardTree(0.5);
const deleted = ['big/large.bin', 'dir1/sub/m1.bin', 'dir2/sub/m5.bin', 'small/s3.bin', 'small/s17.bin'];
const src = join(work, 'src');
await writeTree(src, tree);
const expectedHashes = await hashTree(src, (rel) => deleted.includes(rel));

/** mkntfs, then the tree written and some files deleted through an ntfs-3g mount. */
async function makeNtfs(name: string, clusterSize: number, size: string): Promise<string> {
  const image = join(work, `${name}.img`);
  await must('truncate', ['-s', size, image]);
  await must('mkntfs', ['-F', '-Q', '-q', '-c', String(clusterSize), image]);
  const m = await fuseMount('ntfs', image, join(work, `${name}-rw`), false);
  try {
    await writeTree(m.dir, tree);
    for (const p of deleted) await rm(join(m.dir, p));
  } finally {
    await m.unmount();
  }
  return image;
}

async function allocation(image: string) {
  const dev = await RawDevice.openPath(image);
  try {
    return await findFreeRanges(dev);
  } finally {
    await dev.close();
  }
}

const variants = [
  { name: 'ntfs-4k', clusterSize: 4096, size: '96M' },
  { name: 'ntfs-512', clusterSize: 512, size: '48M' },
  { name: 'ntfs-64k', clusterSize: 65536, size: '160M' },
  { name: 'ntfs-128k', clusterSize: 131072, size: '192M' },
];

for (const v of variants) {
  t.test(v.name, async (tt) => {
    const image = await makeNtfs(v.name, v.clusterSize, v.size);
    const report = await allocation(image);
    tt.equal(report.scheme, 'none');
    tt.equal(report.volumes.length, 1);
    const vol = report.volumes[0];
    tt.equal(vol.fs, 'ntfs');
    tt.notOk(vol.note, 'no note');
    tt.equal(vol.freeBytes, await ntfsFreeBytes(image), 'free bytes equal ntfscluster -i (libntfs-3g over $Bitmap)');
    tt.equal(totalLength(report.free), vol.freeBytes);
    tt.ok(report.free.every((r) => r.offset % v.clusterSize === 0 && r.length % v.clusterSize === 0), 'ranges are whole clusters');

    const copy = join(work, `${v.name}-garbage.img`);
    await copySparse(image, copy);
    tt.equal(await garbageFill(copy, report.free, v.name), vol.freeBytes, 'garbage over every claimed byte');
    const fix = await run('ntfsfix', ['-n', copy]);
    tt.equal(fix.code, 0, `ntfsfix -n clean after garbage: ${fix.stdout.trim().split('\n').pop()}`);
    const m = await fuseMount('ntfs', copy, join(work, `${v.name}-ro`), true);
    try {
      const got = await hashTree(m.dir);
      tt.same([...got.entries()].sort(), [...expectedHashes.entries()].sort(), 'every file reads back with its original sha256');
    } finally {
      await m.unmount();
    }
    await rm(copy);
  });
}

/** Where MFT record `n` (or its $MFTMirr copy) and its attribute of `type` sit in a fresh mkntfs image (whose $MFT starts contiguous). */
async function locate(image: string, n: number, type: number, mirror = false): Promise<{ record: number; attr: number; raw: Buffer }> {
  const fh = await open(image, 'r');
  try {
    const boot = Buffer.alloc(512);
    await fh.read(boot, 0, 512, 0);
    const clusterSize = boot.readUInt16LE(0x0b) * boot[0x0d];
    const cpr = boot.readInt8(0x40);
    const recordSize = cpr > 0 ? cpr * clusterSize : 2 ** -cpr;
    const record = Number(boot.readBigUInt64LE(mirror ? 0x38 : 0x30)) * clusterSize + n * recordSize;
    const raw = Buffer.alloc(recordSize);
    await fh.read(raw, 0, recordSize, record);
    for (let at = raw.readUInt16LE(0x14); raw.readUInt32LE(at) !== 0xffffffff; at += raw.readUInt32LE(at + 4)) {
      if (raw.readUInt32LE(at) === type) return { record, attr: at, raw };
    }
    throw new Error(`no attribute 0x${type.toString(16)} in record ${n}`);
  } finally {
    await fh.close();
  }
}

async function patch(image: string, at: number, bytes: number[]): Promise<void> {
  // Bytes 510..511 of each 512-byte stride belong to the update sequence: a patch there would be a different test.
  for (let i = 0; i < bytes.length; i++) if ((at + i) % 512 >= 510) throw new Error(`patch at ${at + i} hits a fixup`);
  const fh = await open(image, 'r+');
  try {
    await fh.write(Buffer.from(bytes), 0, bytes.length, at);
  } finally {
    await fh.close();
  }
}

t.test('corrupt, dirty and truncated NTFS volumes claim nothing', async (tt) => {
  const base = join(work, 'bad-base.img');
  await must('truncate', ['-s', '32M', base]);
  await must('mkntfs', ['-F', '-Q', '-q', '-c', '4096', base]);
  const variant = async (name: string): Promise<string> => {
    const image = join(work, `${name}.img`);
    await copySparse(base, image);
    return image;
  };
  const expectNote = async (image: string, pattern: RegExp, errorClass: typeof CorruptFilesystemError | typeof UnsupportedFilesystemError) => {
    const started = Date.now();
    const report = await allocation(image);
    tt.equal(report.free.length, 0, `${pattern}: no free ranges`);
    tt.equal(report.volumes[0].fs, 'ntfs');
    tt.match(report.volumes[0].note, pattern, `${pattern}: noted`);
    const dev = await RawDevice.openPath(image);
    try {
      await tt.rejects(readNtfsAllocation(dev, { offset: 0, length: dev.size }), errorClass, `${pattern}: typed error`);
    } finally {
      await dev.close();
    }
    tt.ok(Date.now() - started < 2000, `${pattern}: answered quickly`);
  };
  tt.ok((await allocation(base)).volumes[0].freeBytes > 0, 'the unpatched base has free space');

  // $Bitmap's first run moved far past the volume: LCN delta bytes set to 0x7f...
  const farRun = await variant('far-run');
  const bmp = await locate(farRun, 6, 0x80);
  const runlist = bmp.attr + bmp.raw.readUInt16LE(bmp.attr + 0x20);
  const header = bmp.raw[runlist];
  const lengthSize = header & 0x0f;
  const offsetSize = header >> 4;
  await patch(farRun, bmp.record + runlist + 1 + lengthSize, [...Array(offsetSize - 1).fill(0xff), 0x7f]);
  await expectNote(farRun, /\$Bitmap \$DATA: run of \d+ clusters at cluster \d+ lies outside the volume's \d+ clusters/, CorruptFilesystemError);

  // A torn write: the last two bytes of $Bitmap's record's first stride no longer hold the update sequence number.
  const torn = await variant('torn');
  const tornAt = (await locate(torn, 6, 0x80)).record + 510;
  const fh = await open(torn, 'r+');
  await fh.write(Buffer.from([0x12, 0x34]), 0, 2, tornAt);
  await fh.close();
  await expectNote(torn, /MFT record 6 \(\$Bitmap\): stride 0 ends with 0x3412.*torn write/, CorruptFilesystemError);

  const baad = await variant('baad');
  await patch(baad, (await locate(baad, 6, 0x80)).record, [...Buffer.from('BAAD')]);
  await expectNote(baad, /expected signature "FILE", found "BAAD"/, CorruptFilesystemError);

  // Dirty: set VOLUME_IS_DIRTY in $Volume's $VOLUME_INFORMATION (and its $MFTMirr copy); libntfs-3g confirms the patch means what we think.
  const dirty = await variant('dirty');
  for (const mirror of [false, true]) {
    const vi = await locate(dirty, 3, 0x70, mirror);
    await patch(dirty, vi.record + vi.attr + vi.raw.readUInt16LE(vi.attr + 0x14) + 10, [0x01, 0x00]);
  }
  const info = await run('ntfsinfo', ['-m', dirty]);
  tt.match(info.stderr + info.stdout, /Volume is scheduled for check/, 'libntfs-3g sees the dirty flag');
  await expectNote(dirty, /marked dirty/, UnsupportedFilesystemError);

  // The boot sector says the volume is longer than the device (a truncated copy).
  const cut = await variant('cut');
  await truncate(cut, 16 * 1024 * 1024);
  await expectNote(cut, /do not fit the volume of 16777216 bytes/, CorruptFilesystemError);

  // A boot sector cut off at 300 bytes.
  const stub = join(work, 'stub.img');
  const head = Buffer.alloc(300);
  const bh = await open(base, 'r');
  await bh.read(head, 0, 300, 0);
  await bh.close();
  await writeFile(stub, head);
  await expectNote(stub, /NTFS boot sector: bytes 0\.\.512 lie outside the volume of 300 bytes/, CorruptFilesystemError);
});

t.test('pure parsers: boot sector encodings, runlists, fixups', async (tt) => {
  const boot = (spc: number, cpr: number, totalSectors = 2n ** 20n): Uint8Array => {
    const b = Buffer.alloc(512);
    b.write('NTFS    ', 3, 'latin1');
    b.writeUInt16LE(512, 0x0b);
    b[0x0d] = spc;
    b.writeBigUInt64LE(totalSectors, 0x28);
    b.writeBigUInt64LE(4n, 0x30);
    b.writeBigUInt64LE(8n, 0x38);
    b.writeInt8(cpr, 0x40);
    return b;
  };
  tt.match(parseNtfsBootSector(boot(8, -10)), { clusterSize: 4096, mftRecordSize: 1024, totalClusters: 2 ** 17 });
  tt.match(parseNtfsBootSector(boot(0x80, -10)), { clusterSize: 65536 }, '0x80 is 128 sectors');
  tt.match(parseNtfsBootSector(boot(0xf8, -12)), { sectorsPerCluster: 256, clusterSize: 131072, mftRecordSize: 4096 }, '0xF8 is 2^8 sectors');
  tt.match(parseNtfsBootSector(boot(0xf4, -10)), { clusterSize: 2 * 1024 * 1024 }, '0xF4 is 2^12 sectors: 2 MiB');
  tt.throws(() => parseNtfsBootSector(boot(0xf3, -10)), { message: /cluster size 4194304 exceeds/ });
  tt.throws(() => parseNtfsBootSector(boot(0x81, -10)), CorruptFilesystemError, '0x81 is 2^127 sectors');
  tt.throws(() => parseNtfsBootSector(boot(3, -10)), { message: /sectors per cluster byte 0x3 is not a power of two/ });
  tt.match(parseNtfsBootSector(boot(1, 2)), { mftRecordSize: 1024 }, 'positive: clusters per record');
  tt.throws(() => parseNtfsBootSector(boot(8, -8)), { message: /gives 256 bytes/ });
  tt.throws(() => parseNtfsBootSector(boot(8, -10, 2n ** 63n)), { message: /exceeds 2\^53/ });
  tt.throws(() => parseNtfsBootSector(boot(8, -10, 16n)), { message: /past the volume's 2 clusters/ });

  const runs = (bytes: number[], total = 1000) => decodeRunlist(Uint8Array.from(bytes), 0, bytes.length, 0, total, 'test');
  tt.same(runs([0x21, 0x10, 0x00, 0x01, 0x11, 0x05, 0xf0, 0x00]), [
    { vcn: 0, lcn: 256, length: 16 },
    { vcn: 16, lcn: 240, length: 5 },
  ], 'negative delta');
  tt.same(runs([0x01, 0x08, 0x00]), [{ vcn: 0, lcn: null, length: 8 }], 'sparse run');
  tt.throws(() => runs([0x21, 0x10, 0x00, 0x01]), { message: /no terminating zero byte/ });
  tt.throws(() => runs([0x21, 0x10, 0x00]), { message: /passes the end of the attribute/ });
  tt.throws(() => runs([0x20, 0x10, 0x00, 0x00]), { message: /header byte 0x20/ }, 'zero-size length');
  tt.throws(() => runs([0x11, 0x10, 0xf0, 0x00]), { message: /at cluster -16 lies outside/ });
  tt.throws(() => runs([0x21, 0x10, 0xe0, 0x03, 0x00]), { message: /run of 16 clusters at cluster 992 lies outside the volume's 1000 clusters/ });
  tt.throws(() => runs([0x11, 0x80, 0x01, 0x00]), { message: /has length -128/ });
  tt.throws(() => runs([0x81, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x00]), { message: /exceeds 2\^53/ });

  const rec = new Uint8Array(1024);
  const dv = new DataView(rec.buffer);
  dv.setUint16(4, 0x30, true);
  dv.setUint16(6, 3, true);
  dv.setUint16(0x30, 0x0007, true); // update sequence number
  dv.setUint16(0x32, 0xaaaa, true);
  dv.setUint16(0x34, 0xbbbb, true);
  dv.setUint16(510, 0x0007, true);
  dv.setUint16(1022, 0x0007, true);
  applyFixups(rec, 'test');
  tt.same([dv.getUint16(510, true), dv.getUint16(1022, true)], [0xaaaa, 0xbbbb], 'saved bytes restored');
  dv.setUint16(510, 0x0007, true);
  dv.setUint16(1022, 0x0008, true);
  tt.throws(() => applyFixups(rec, 'test'), { message: /stride 1 ends with 0x8, expected the update sequence number 0x7/ });
  dv.setUint16(6, 5, true);
  tt.throws(() => applyFixups(rec, 'test'), { message: /has 5 entries, expected 3/ });
});
