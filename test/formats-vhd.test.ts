// Proves our VHD codec: fixed and dynamic disks we write are read identically by qemu-img, vhdiinfo and libvhdi (libyal-compare) and by our reader, up to 2000 GiB, with the spec's CHS, Azure's rules and the 2040 GiB limit; qemu's own VHDs and crafted differencing disks (checked against libvhdi) read right; growing in place over sessions and after crashes at every durable step keeps the disk sound; bad input gets typed one-sentence errors.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { open, readFile, stat, truncate, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { DiskImage, DiskWriter, FileOpener } from '../src/formats/disk-image.js';
import { ChainBrokenError, CorruptImageError, ForeignFormatError, ImagekeepError, UsageError } from '../src/formats/errors.js';
import { LocalFile } from '../src/formats/local-file.js';
import { MemoryFile } from '../src/formats/memory-file.js';
import type { RandomAccessFile } from '../src/formats/types.js';
import {
  batBytes,
  chsBytes,
  chsGeometry,
  decodeFooter,
  decodeHeader,
  encodeFooter,
  encodeHeader,
  encodeLocatorPath,
  type Geometry,
  type VhdHeader,
} from '../src/formats/vhd/codec.js';
import { vhdDriver } from '../src/formats/vhd/index.js';
import {
  libyalCompare,
  libyalInfo,
  makeScatteredRaw,
  qemuCompare,
  qemuConvert,
  qemuInfo,
  qemuToRaw,
  runTool,
} from './helpers/disk-tools.js';
import { prng, readFileAt, tempDir } from './helpers/cli.js';

const { dir: work, cleanup } = await tempDir('vhd');
t.teardown(cleanup);

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const CHUNK = 4 * MiB;

/** Opens names relative to `dir`, as the registry's local opener does. */
function openerIn(dir: string): FileOpener {
  return (name, mode) => LocalFile.open(name.startsWith('/') ? name : join(dir, name), mode);
}
const noSiblings: FileOpener = async (name) => {
  throw new UsageError(`this test disk has no sibling ${name}`);
};

/** The error a promise rejects with (fails the test when it resolves). */
async function refusal(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected a refusal, but the call succeeded');
}

/** One sentence: no line breaks, numbers where there are numbers. */
function oneSentence(tt: Test, e: Error, cls: new (...a: never[]) => Error, pattern: RegExp): void {
  tt.type(e, cls, `${cls.name}: ${e.message}`);
  tt.notMatch(e.message, /\n/, 'one line');
  tt.match(e.message, pattern);
}

/** Copies a raw file into a writer as an export would: 4 MiB ascending, all-zero chunks skipped. */
async function copyRaw(raw: string, w: DiskWriter): Promise<void> {
  const fh = await open(raw, 'r');
  try {
    const size = (await fh.stat()).size;
    const buf = Buffer.alloc(CHUNK);
    const zero = Buffer.alloc(CHUNK);
    for (let at = 0; at < size; at += CHUNK) {
      const n = Math.min(CHUNK, size - at);
      await fh.read(buf, 0, n, at);
      if (buf.subarray(0, n).equals(zero.subarray(0, n))) continue;
      await w.write(buf.subarray(0, n), at);
    }
  } finally {
    await fh.close();
  }
}

async function writeVhd(raw: string, out: string, subformat: string, extra: { blockSize?: number } = {}): Promise<void> {
  const size = (await stat(raw)).size;
  const w = await vhdDriver.create!(await LocalFile.open(out, 'w'), noSiblings, { size, subformat, finalName: out, ...extra });
  await copyRaw(raw, w);
  await w.close();
}

async function openVhd(path: string, opener: FileOpener = noSiblings): Promise<DiskImage> {
  const f = await LocalFile.open(path, 'r');
  try {
    return await vhdDriver.open(f, opener);
  } catch (e) {
    await f.close();
    throw e;
  }
}

async function checkVhd(path: string, opener: FileOpener = noSiblings) {
  const f = await LocalFile.open(path, 'r');
  try {
    return await vhdDriver.check(f, opener);
  } finally {
    await f.close();
  }
}

/**
 * Where a disk first reads differently from a raw file (or null when it reads the same,
 * size included), comparing 4 MiB at a time: cheaper than hashing both, and it says where.
 */
async function differsFromRaw(disk: DiskImage, raw: string): Promise<string | null> {
  const fh = await open(raw, 'r');
  try {
    const rawSize = (await fh.stat()).size;
    if (rawSize !== disk.size) return `the disk is ${disk.size} bytes, the raw ${rawSize}`;
    const a = Buffer.alloc(CHUNK);
    const b = Buffer.alloc(CHUNK);
    for (let at = 0; at < disk.size; at += CHUNK) {
      const n = Math.min(CHUNK, disk.size - at);
      await disk.read(a.subarray(0, n), at);
      await fh.read(b, 0, n, at);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) {
        let i = 0;
        while (a[i] === b[i]) i++;
        return `first difference at byte ${at + i}`;
      }
    }
    return null;
  } finally {
    await fh.close();
  }
}

async function sameAsRaw(disk: DiskImage, raw: string): Promise<boolean> {
  return (await differsFromRaw(disk, raw)) === null;
}

const KEEP_PARENT_COMPARE = `
import sys, pyvhdi
child, raw, parent = sys.argv[1:4]
p = pyvhdi.file(); p.open(parent)
h = pyvhdi.file(); h.open(child); h.set_parent(p)
size = h.get_media_size()
with open(raw, 'rb') as r:
    data = r.read()
if size != len(data):
    print('DIFFERENT: sizes differ', size, len(data)); sys.exit(1)
for off in range(0, size, 1 << 20):
    n = min(1 << 20, size - off)
    if h.read_buffer_at_offset(n, off) != data[off:off + n]:
        print('DIFFERENT: in the MiB at', off); sys.exit(1)
print('identical')
`;

/**
 * libyal-compare.py with a parent. The shared script passes the parent's handle to
 * set_parent without keeping a reference, so Python frees it and libvhdi fails with
 * "missing file IO handle" on the first read from the parent; then the same comparison is
 * made by this script, which keeps the parent open.
 */
async function libvhdiCompare(child: string, raw: string, parent: string) {
  const r = await libyalCompare(child, raw, parent);
  if (r.code === 2 && /missing file IO handle/.test(r.stdout)) {
    return runTool('/usr/bin/python3', ['-c', KEEP_PARENT_COMPARE, child, raw, parent]);
  }
  return r;
}


/** Everything the independent tools and our own check say about a VHD made from `raw`. */
async function provesIdentical(tt: Test, raw: string, vhd: string, subformat: string): Promise<void> {
  const size = (await stat(raw)).size;
  const [cmp, info, vinfo, lcmp, ours, report] = await Promise.all([
    qemuCompare(raw, vhd, 'vhd'),
    qemuInfo(vhd, 'vhd'),
    libyalInfo(vhd, 'vhd'),
    libyalCompare(vhd, raw),
    openVhd(vhd).then(async (d) => {
      try {
        return { differs: await differsFromRaw(d, raw), size: d.size, subformat: d.subformat };
      } finally {
        await d.close();
      }
    }),
    checkVhd(vhd),
  ]);
  tt.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`);
  tt.notMatch(cmp.stdout + cmp.stderr, /mismatch/i, 'no size mismatch warning');
  tt.equal(info.format, 'vpc');
  tt.equal(info['virtual-size'], size, 'qemu-img info: exactly the raw size');
  tt.equal(vinfo.code, 0, 'vhdiinfo parses it');
  tt.match(vinfo.stdout, new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`));
  tt.match(vinfo.stdout, subformat === 'fixed' ? /Disk type\s*:\s*Fixed/ : /Disk type\s*:\s*Dynamic/);
  tt.equal(lcmp.code, 0, `libyal-compare: ${lcmp.stdout.trim()}`);
  tt.same(report.problems, [], 'our check is clean');
  tt.equal(report.layout.virtualSize, size);
  tt.equal(report.layout.creator, 'win ');
  tt.equal(ours.size, size);
  tt.equal(ours.subformat, subformat);
  tt.equal(ours.differs, null, 'our reader reads the raw back');
}

// ---- (a), (b): scattered data, fixed and dynamic, block-multiple and odd sizes -------------

const layouts: { name: string; size: number; count: number }[] = [
  { name: '1gib', size: GiB, count: 200 },
  // A multiple of 512 but of no block size. Kept at 64 MiB: libvhdi reads dynamic VHDs at
  // about 120 MiB/s, and the odd tail is what this case is about.
  { name: 'odd', size: 64 * MiB + 7 * 512, count: 40 },
];

for (const l of layouts) {
  t.test(`${l.name} (${l.size} bytes) of scattered data`, async (tt) => {
    const raw = join(work, `${l.name}.raw`);
    const disk = await makeScatteredRaw(raw, l.size, { seed: l.size % 1000, count: l.count });
    tt.ok(disk.extents.length > 10);
    for (const subformat of ['fixed', 'dynamic']) {
      await tt.test(subformat, async (t2) => {
        const vhd = join(work, `${l.name}-${subformat}.vhd`);
        const t0 = Date.now();
        await writeVhd(raw, vhd, subformat);
        t2.comment(`written in ${Date.now() - t0} ms`);
        const st = await stat(vhd);
        if (subformat === 'fixed') t2.equal(st.size, l.size + 512, 'fixed: data + footer');
        else t2.ok(st.blocks * 512 < l.size / 4, `dynamic: sparse (${st.blocks * 512} bytes used of ${l.size})`);
        await provesIdentical(t2, raw, vhd, subformat);
        if (subformat === 'dynamic') {
          const d = await openVhd(vhd);
          const alloc = await d.allocated();
          await d.close();
          for (const e of disk.extents) {
            const covered = alloc.some((r) => r.offset <= e.offset && e.offset + e.length <= r.offset + r.length);
            if (!covered) t2.fail(`extent ${e.offset}+${e.length} is not in allocated()`);
          }
          const report = await checkVhd(vhd);
          t2.equal(report.layout.batEntries, Math.ceil(l.size / (2 * MiB)), 'maxTableEntries = ceil(size / block size)');
          t2.equal(report.layout.blockSize, 2 * MiB);
        }
      });
    }
  });
}

// ---- (c): 2000 GiB ----------------------------------------------------------------------

t.test('2000 GiB dynamic holding a few blocks; above 2040 GiB refused', async (tt) => {
  const size = 2000 * GiB;
  const vhd = join(work, 'huge.vhd');
  const w = await vhdDriver.create!(await LocalFile.open(vhd, 'w'), noSiblings, { size, finalName: 'huge.vhd' });
  // Whole blocks of one pattern byte each, at the start, past 2^31 and 2^32 bytes, in the
  // middle, and the last block; plus one partial block.
  const blocks = [0, 1024, 2049, 500_000, 999_999, size / (2 * MiB) - 1];
  const patterns = new Map<number, number>();
  for (const [k, b] of blocks.entries()) {
    const p = 0x11 + k * 0x11;
    patterns.set(b, p);
    await w.write(Buffer.alloc(2 * MiB, p), b * 2 * MiB);
  }
  const partialAt = 700_000 * 2 * MiB + 3 * 512;
  await w.write(Buffer.alloc(5 * 512, 0xab), partialAt);
  await w.close();

  const info = await qemuInfo(vhd, 'vhd');
  tt.equal(info['virtual-size'], size, 'qemu-img info: 2000 GiB');
  const report = await checkVhd(vhd);
  tt.same(report.problems, []);
  tt.equal(report.layout.virtualSize, size);
  tt.equal(report.layout.batEntries, 1_024_000, 'BAT entries for 2000 GiB of 2 MiB blocks');
  tt.equal(report.layout.allocatedBlocks, blocks.length + 1);
  tt.ok((await stat(vhd)).size < 20 * MiB, 'the file holds only the BAT and seven blocks');

  const d = await openVhd(vhd);
  tt.equal(d.size, size);
  const rand = prng(7);
  const qemuCmds: string[] = [];
  const buf = Buffer.alloc(2 * MiB);
  for (const [b, p] of patterns) {
    await d.read(buf, b * 2 * MiB);
    tt.ok(buf.equals(Buffer.alloc(2 * MiB, p)), `block ${b} reads its pattern 0x${p.toString(16)}`);
    qemuCmds.push('-c', `read -P 0x${p.toString(16)} ${b * 2 * MiB} ${2 * MiB}`);
  }
  const small = Buffer.alloc(8 * 512);
  await d.read(small, partialAt - 1024);
  tt.ok(small.subarray(0, 1024).equals(Buffer.alloc(1024)) && small.subarray(1024, 1024 + 2560).equals(Buffer.alloc(2560, 0xab)), 'partial block: zeros around the written sectors');
  qemuCmds.push('-c', `read -P 0xab ${partialAt} ${5 * 512}`, '-c', `read -P 0 ${partialAt - 1536} 1536`, '-c', `read -P 0 ${partialAt + 2560} ${2 * MiB - 3 * 512 - 2560}`);
  for (let i = 0; i < 8; i++) {
    const b = Number(rand(8).readBigUInt64LE(0) % BigInt(size / (2 * MiB)));
    if (patterns.has(b) || b === 700_000) continue;
    const at = b * 2 * MiB + 512 * (rand(1)[0]! % 16);
    const got = Buffer.alloc(64 * KiB, 1);
    await d.read(got, at);
    tt.ok(got.equals(Buffer.alloc(64 * KiB)), `unwritten ${at} reads zeros`);
    qemuCmds.push('-c', `read -P 0 ${at} ${64 * KiB}`);
  }
  await d.close();
  const io = await runTool('qemu-io', ['-r', '-f', 'vpc', ...qemuCmds, vhd]);
  tt.equal(io.code, 0, 'qemu-io reads every pattern');
  tt.notMatch(io.stdout + io.stderr, /Pattern verification failed/);

  const at2040 = await vhdDriver.create!(new MemoryFile('max.vhd'), noSiblings, { size: 2040 * GiB, finalName: 'max.vhd' });
  tt.equal(at2040.size, 2040 * GiB, '2040 GiB is accepted');
  await at2040.abort();
  for (const subformat of ['dynamic', 'fixed']) {
    const e = await refusal(vhdDriver.create!(new MemoryFile('big.vhd'), noSiblings, { size: 2040 * GiB + 512, subformat, finalName: 'big.vhd' }));
    oneSentence(tt, e, UsageError, /2040 GiB.*VHDX/);
  }
});

// ---- CHS geometry -----------------------------------------------------------------------

t.test('CHS geometry: the spec algorithm, and what qemu-img create -f vpc writes for CHS-exact sizes', async (tt) => {
  const known: [number, Geometry][] = [
    [64 * MiB, { cylinders: 963, heads: 8, sectorsPerTrack: 17 }],
    [GiB, { cylinders: 2080, heads: 16, sectorsPerTrack: 63 }],
    [127 * GiB + 8 * KiB, { cylinders: 65279, heads: 16, sectorsPerTrack: 255 }],
    [200 * GiB, { cylinders: 65535, heads: 16, sectorsPerTrack: 255 }],
    [2040 * GiB, { cylinders: 65535, heads: 16, sectorsPerTrack: 255 }],
  ];
  for (const [size, g] of known) tt.same(chsGeometry(size), g, `${size} bytes`);

  // Sizes in each branch of the algorithm (17, 31, 63 and 255 sectors per track), made
  // CHS-exact so qemu keeps them as given; qemu's geometry must be ours.
  for (const nominal of [3 * MiB, 20 * MiB, 300 * MiB, 500 * MiB, 4 * GiB, 40 * GiB, 100 * GiB]) {
    const exact = chsBytes(chsGeometry(nominal));
    const path = join(work, `chs-${nominal}.vhd`);
    const r = await runTool('qemu-img', ['create', '-q', '-f', 'vpc', path, String(exact)]);
    tt.equal(r.code, 0, r.stderr);
    const f = decodeFooter(await readFileAt(path, 0, 512));
    tt.equal(f.currentSize, exact, `qemu keeps the CHS-exact size ${exact}`);
    tt.same(f.geometry, chsGeometry(exact), `geometry for ${exact} bytes: ${JSON.stringify(f.geometry)}`);
  }

  // Our own footer carries the spec's geometry for a size that is not CHS-exact, and qemu
  // still sees the exact size because the creator is "win ".
  const path = join(work, 'chs-ours.vhd');
  const w = await vhdDriver.create!(await LocalFile.open(path, 'w'), noSiblings, { size: 64 * MiB, finalName: 'chs-ours.vhd' });
  await w.close();
  const f = decodeFooter(await readFileAt(path, 0, 512));
  tt.same(f.geometry, { cylinders: 963, heads: 8, sectorsPerTrack: 17 });
  tt.equal(f.creatorApp, 'win ');
  tt.equal(f.creatorHostOs, 'Wi2k');
  tt.equal((await qemuInfo(path, 'vhd'))['virtual-size'], 64 * MiB);
});

// ---- Azure ------------------------------------------------------------------------------

t.test('azure: fixed, a whole number of MiB, footer and geometry; other sizes refused', async (tt) => {
  const path = join(work, 'azure.vhd');
  const size = 20 * MiB;
  const w = await vhdDriver.create!(await LocalFile.open(path, 'w'), noSiblings, { size, azure: true, finalName: 'azure.vhd' });
  tt.equal(w.subformat, 'fixed');
  await w.write(Buffer.alloc(4096, 0x42), 8 * MiB);
  await w.close();
  tt.equal((await stat(path)).size, size + 512, "Azure's upload size: 20 MiB + 512");
  const tail = await readFileAt(path, size, 512);
  tt.equal(tail.toString('latin1', 0, 8), 'conectix');
  const f = decodeFooter(tail);
  tt.equal(f.diskType, 2);
  tt.equal(f.dataOffset, null, 'fixed: data offset all ones');
  tt.equal(f.currentSize, size);
  tt.equal(f.originalSize, size);
  tt.same(f.geometry, chsGeometry(size));
  tt.equal(f.features, 2);
  tt.equal(f.formatVersion, 0x00010000);
  tt.equal((await qemuInfo(path, 'vhd'))['virtual-size'], size);
  tt.same((await checkVhd(path)).problems, []);

  const odd = await refusal(vhdDriver.create!(new MemoryFile('a.vhd'), noSiblings, { size: size + 512, azure: true, finalName: 'a.vhd' }));
  oneSentence(tt, odd, UsageError, /whole number of MiB; 20972032 bytes is 512 bytes past 20 MiB: round it up to 22020096/);
  const dyn = await refusal(vhdDriver.create!(new MemoryFile('a.vhd'), noSiblings, { size, azure: true, subformat: 'dynamic', finalName: 'a.vhd' }));
  oneSentence(tt, dyn, UsageError, /Azure takes only fixed VHDs/);
  const notSector = await refusal(vhdDriver.create!(new MemoryFile('a.vhd'), noSiblings, { size: MiB + 100, subformat: 'fixed', finalName: 'a.vhd' }));
  oneSentence(tt, notSector, UsageError, /multiple of 512 bytes; 1048676/);
  const fixedOdd = await vhdDriver.create!(new MemoryFile('a.vhd'), noSiblings, { size: MiB + 512, subformat: 'fixed', finalName: 'a.vhd' });
  tt.equal(fixedOdd.size, MiB + 512, 'without azure a fixed disk may be any multiple of 512');
  await fixedOdd.abort();
});

// ---- qemu's VHDs read by us ---------------------------------------------------------------

t.test("qemu-img's VHDs read byte-identically to qemu-img convert -O raw", async (tt) => {
  const raw = join(work, 'q-src.raw');
  await makeScatteredRaw(raw, 48 * MiB, { seed: 11, count: 40 });
  const made: { name: string; make: () => Promise<unknown>; subformat: string }[] = [
    { name: 'q-create.vhd', subformat: 'dynamic', make: async () => {
      const p = join(work, 'q-create.vhd');
      await runTool('qemu-img', ['create', '-q', '-f', 'vpc', p, '64M']);
      return runTool('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x5a 0 1024', '-c', 'write -P 0x33 3M 4096', '-c', `write -P 0x77 ${67125248 - 4096} 4096`, p]);
    } },
    { name: 'q-dyn.vhd', subformat: 'dynamic', make: () => qemuConvert(raw, join(work, 'q-dyn.vhd'), 'vhd') },
    { name: 'q-dyn-force.vhd', subformat: 'dynamic', make: () => qemuConvert(raw, join(work, 'q-dyn-force.vhd'), 'vhd', 'force_size=on') },
    { name: 'q-fixed.vhd', subformat: 'fixed', make: () => qemuConvert(raw, join(work, 'q-fixed.vhd'), 'vhd', 'subformat=fixed,force_size=on') },
  ];
  for (const m of made) {
    await m.make();
    const vhd = join(work, m.name);
    const ref = join(work, `${m.name}.raw`);
    const r = await qemuToRaw(vhd, 'vhd', ref);
    tt.equal(r.code, 0, r.stderr);
    const d = await openVhd(vhd);
    tt.equal(d.subformat, m.subformat, `${m.name}: ${m.subformat}`);
    tt.equal(d.size, (await stat(ref)).size, `${m.name}: same size as qemu reads`);
    tt.equal(await differsFromRaw(d, ref), null, `${m.name}: same bytes as qemu reads`);
    await d.close();
    const report = await checkVhd(vhd);
    tt.same(report.problems.filter((p) => !/geometry/.test(p)), [], `${m.name}: check finds nothing beyond qemu's CHS choices`);
  }
});

// ---- differencing -------------------------------------------------------------------------

interface ChildBlockPlan {
  block: number;
  /** Sectors of the block the child holds. */
  sectors: number[];
}

interface LocatorPlan {
  code: 'W2ru' | 'W2ku' | 'MacX';
  path: string;
}

/**
 * A test-only builder of differencing VHDs: footer (type 4), header naming the parent,
 * locators after the BAT, blocks with partial MSB-first bitmaps. Sectors the bitmap does
 * not mark hold 0xEE, so a reader that ignores the bitmap reads garbage.
 */
async function buildDifferencing(
  path: string,
  opts: { size: number; blockSize: number; parentId: Uint8Array; parentName: string; locators: LocatorPlan[]; blocks: ChildBlockPlan[]; seed: number },
): Promise<Map<number, Buffer>> {
  const { size, blockSize } = opts;
  const entries = Math.ceil(size / blockSize);
  const bitmapSize = Math.ceil(blockSize / 512 / 8 / 512) * 512;
  const footer = encodeFooter({
    features: 2, formatVersion: 0x00010000, dataOffset: 512, timestamp: 12345, creatorApp: 'win ', creatorVersion: 0x000a0000,
    creatorHostOs: 'Wi2k', originalSize: size, currentSize: size, geometry: chsGeometry(size), diskType: 4, checksum: 0,
    uniqueId: randomBytes(16), savedState: 0,
  });
  const tableOffset = 1536;
  let at = tableOffset + batBytes(entries);
  const locatorData: { at: number; data: Buffer }[] = [];
  const locators = opts.locators.map((l) => {
    const data = encodeLocatorPath(l.code, l.path);
    const space = Math.ceil(data.length / 512) * 512;
    const loc = { platformCode: l.code, dataSpace: space / 512, dataLength: data.length, dataOffset: at };
    locatorData.push({ at, data });
    at += space;
    return loc;
  });
  const header: VhdHeader = {
    dataOffset: null, tableOffset, headerVersion: 0x00010000, maxTableEntries: entries, blockSize, checksum: 0,
    parentUniqueId: opts.parentId, parentTimestamp: 0, parentName: opts.parentName, locators,
  };
  const bat = Buffer.alloc(batBytes(entries), 0xff);
  const rand = prng(opts.seed);
  const childSectors = new Map<number, Buffer>();
  const blocks: { at: number; data: Buffer }[] = [];
  for (const b of opts.blocks) {
    bat.writeUInt32BE(at / 512, b.block * 4);
    const bitmap = Buffer.alloc(bitmapSize);
    const data = Buffer.alloc(blockSize, 0xee);
    for (const s of b.sectors) {
      bitmap[Math.floor(s / 8)]! |= 0x80 >> (s % 8);
      const sector = rand(512);
      sector.copy(data, s * 512);
      childSectors.set(b.block * (blockSize / 512) + s, sector);
    }
    blocks.push({ at, data: Buffer.concat([bitmap, data]) });
    at += bitmapSize + blockSize;
  }
  const fh = await open(path, 'w');
  try {
    await fh.write(footer, 0, 512, 0);
    await fh.write(encodeHeader(header), 0, 1024, 512);
    await fh.write(bat, 0, bat.length, tableOffset);
    for (const l of locatorData) await fh.write(l.data, 0, l.data.length, l.at);
    for (const b of blocks) await fh.write(b.data, 0, b.data.length, b.at);
    await fh.write(footer, 0, 512, at);
  } finally {
    await fh.close();
  }
  return childSectors;
}

/** The raw a child is expected to read as: the parent's raw with the child's sectors laid over it. */
async function expectedRaw(parentRaw: string, out: string, childSectors: Map<number, Buffer>): Promise<void> {
  const bytes = await readFile(parentRaw);
  for (const [s, data] of childSectors) data.copy(bytes, s * 512);
  await writeFile(out, bytes);
}

t.test('differencing: partial MSB-first bitmaps read as libvhdi reads them, parents found by locator', async (tt) => {
  const dir = join(work, 'diff');
  await mkdir(join(dir, 'base'), { recursive: true });
  const size = 15 * MiB + 5 * 512;
  const blockSize = 2 * MiB;
  const parentRaw = join(dir, 'parent.raw');
  await makeScatteredRaw(parentRaw, size, { seed: 21, count: 30, maxLength: 512 * KiB });
  const parentVhd = join(dir, 'base', 'parent.vhd');
  await writeVhd(parentRaw, parentVhd, 'dynamic');
  const parentId = decodeFooter(await readFileAt(parentVhd, 0, 512)).uniqueId;
  const spb = blockSize / 512;
  const run = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);
  // libvhdi (20210425, and libyal's code to date) reads a VHD bitmap byte as "sector i is the
  // child's when any bit of the byte at or before i is set" (it shifts without masking), so it
  // is a true oracle only where the set bits of each byte end the byte: 0xFF, 0x0F, 0x01...
  // This plan keeps to that (and the 4 KiB granularity Windows writes); the sub-byte child
  // below is checked by our reader alone.
  const plan: ChildBlockPlan[] = [
    { block: 0, sectors: [...run(0, 8), ...run(100, 104), spb - 1] },
    { block: 1, sectors: [] },
    { block: 2, sectors: run(0, spb) },
    { block: 3, sectors: run(0, spb).filter((s) => Math.floor(s / 8) % 2 === 0 || s % 8 >= 6) },
    { block: 6, sectors: [15, ...run(16, 24), ...run(1020, 1032)] },
    { block: 7, sectors: [...run(0, 8), ...run(2044, 2048), 2050, 2051, 2052] }, // the last block holds 2053 sectors of the disk
  ];
  for (const b of plan) tt.ok(b.sectors.every((s) => b.block * spb + s < size / 512), `block ${b.block}: sectors inside the disk`);

  const child = join(dir, 'child.vhd');
  const sectors = await buildDifferencing(child, {
    size, blockSize, parentId, parentName: 'parent.vhd', seed: 22,
    locators: [{ code: 'W2ru', path: '.\\base\\parent.vhd' }, { code: 'W2ku', path: 'C:\\VMs\\base\\parent.vhd' }],
    blocks: plan,
  });
  const expected = join(dir, 'expected.raw');
  await expectedRaw(parentRaw, expected, sectors);

  const lcmp = await libvhdiCompare(child, expected, parentVhd);
  tt.equal(lcmp.code, 0, `libvhdi reads the crafted child as expected: ${lcmp.stdout.trim()}`);
  const d = await openVhd(child, openerIn(dir));
  tt.equal(d.subformat, 'differencing');
  tt.equal(await differsFromRaw(d, expected), null, 'our reader: child over parent, sector by sector');
  // Unaligned reads across child/parent sector runs.
  const exp = await readFile(expected);
  const rand = prng(23);
  for (let i = 0; i < 40; i++) {
    const at = rand(4).readUInt32LE(0) % (size - 70_000);
    const len = 1 + (rand(4).readUInt32LE(0) % 66_000);
    const got = Buffer.alloc(len);
    await d.read(got, at);
    if (!got.equals(exp.subarray(at, at + len))) tt.fail(`unaligned read ${len} at ${at} differs`);
  }
  const alloc = await d.allocated();
  await d.close();
  tt.ok(alloc.length > 0 && alloc.every((r) => r.offset % 512 === 0 && r.offset + r.length <= size), 'allocated(): inside the disk');
  for (const b of plan) {
    if (!alloc.some((r) => r.offset <= b.block * blockSize && b.block * blockSize < r.offset + r.length)) tt.fail(`child block ${b.block} missing from allocated()`);
  }
  const report = await checkVhd(child, openerIn(dir));
  tt.same(report.problems, [], 'check: sound, parent found with the right id');
  tt.equal(report.layout.parentName, 'parent.vhd');
  tt.equal(report.layout.allocatedBlocks, plan.length);

  // Reversing the bit order is noticed by libvhdi (0x0F becomes 0xF0): the oracle is sharp.
  const flipped = join(dir, 'flipped.vhd');
  await buildDifferencing(flipped, {
    size, blockSize, parentId, parentName: 'parent.vhd', seed: 22,
    locators: [{ code: 'W2ru', path: '.\\base\\parent.vhd' }],
    blocks: plan.map((b) => ({ ...b, sectors: b.sectors.map((s) => s - (s % 8) + 7 - (s % 8)) })),
  });
  tt.equal((await libvhdiCompare(flipped, expected, parentVhd)).code, 1, 'libvhdi sees the bit order');

  // Sub-byte bitmaps (isolated sectors, alternating sectors): our reader, sector by sector.
  const fine = join(dir, 'fine.vhd');
  const finePlan: ChildBlockPlan[] = [
    { block: 0, sectors: [1, 100, 101, 2000, 2002, 2004, spb - 2] },
    { block: 3, sectors: run(0, spb).filter((s) => s % 2 === 0) },
    { block: 5, sectors: run(0, spb).filter((s) => s % 3 === 1) },
    { block: 7, sectors: [0, 2, 2052] },
  ];
  const fineSectors = await buildDifferencing(fine, {
    size, blockSize, parentId, parentName: 'parent.vhd', seed: 25, locators: [{ code: 'W2ru', path: '.\\base\\parent.vhd' }], blocks: finePlan,
  });
  const fineExpected = join(dir, 'fine.raw');
  await expectedRaw(parentRaw, fineExpected, fineSectors);
  const fd = await openVhd(fine, openerIn(dir));
  tt.ok(await sameAsRaw(fd, fineExpected), 'sub-byte bitmaps: every sector from the layer its bit names');
  await fd.close();
  const fineLibvhdi = await libvhdiCompare(fine, fineExpected, parentVhd);
  tt.comment(`libvhdi on sub-byte bitmaps (its known misreading): ${fineLibvhdi.stdout.trim()}`);

  // Each kind of locator alone finds the parent.
  const variants: [string, LocatorPlan[], string][] = [
    ['w2ku-only.vhd', [{ code: 'W2ku', path: 'D:\\elsewhere\\parent.vhd' }], 'absolute Windows path: its file name beside the child'],
    ['macx-only.vhd', [{ code: 'MacX', path: 'file://./base/parent.vhd' }], 'MacX file URL'],
    ['name-only.vhd', [], 'the parent-name field'],
  ];
  await writeFile(join(dir, 'parent.vhd'), await readFile(parentVhd));
  for (const [name, locators, what] of variants) {
    const p = join(dir, name);
    await buildDifferencing(p, { size, blockSize, parentId, parentName: 'parent.vhd', seed: 22, locators, blocks: plan });
    const v = await openVhd(p, openerIn(dir));
    tt.equal(await differsFromRaw(v, expected), null, what);
    await v.close();
  }

  // A chain of three: grandchild -> child (in sub/) -> parent (in sub/base/), names relative to each disk.
  const sub = join(dir, 'sub');
  await mkdir(join(sub, 'base'), { recursive: true });
  await writeFile(join(sub, 'base', 'parent.vhd'), await readFile(parentVhd));
  await writeFile(join(sub, 'child.vhd'), await readFile(child));
  const childId = decodeFooter(await readFileAt(child, 0, 512)).uniqueId;
  const grand = join(dir, 'grand.vhd');
  const grandSectors = await buildDifferencing(grand, {
    size, blockSize, parentId: childId, parentName: 'child.vhd', seed: 24,
    locators: [{ code: 'W2ru', path: '.\\sub\\child.vhd' }],
    blocks: [{ block: 0, sectors: [5, 6, 200] }, { block: 4, sectors: [0, 1] }],
  });
  const expected3 = join(dir, 'expected3.raw');
  await expectedRaw(expected, expected3, grandSectors);
  const g = await openVhd(grand, openerIn(dir));
  tt.equal(await differsFromRaw(g, expected3), null, 'three layers, each sector from the newest layer that has it');
  await g.close();

  // Wrong parent id, missing parent: ChainBrokenError, one sentence.
  const wrong = join(dir, 'wrong-id.vhd');
  await buildDifferencing(wrong, { size, blockSize, parentId: randomBytes(16), parentName: 'parent.vhd', seed: 22, locators: [{ code: 'W2ru', path: '.\\parent.vhd' }], blocks: plan });
  oneSentence(tt, await refusal(openVhd(wrong, openerIn(dir))), ChainBrokenError, /needs the parent with unique id [0-9a-f-]{36}, but parent.vhd has id/);
  const lost = join(dir, 'lost.vhd');
  await buildDifferencing(lost, { size, blockSize, parentId, parentName: 'gone.vhd', seed: 22, locators: [{ code: 'W2ru', path: '.\\gone.vhd' }], blocks: plan });
  oneSentence(tt, await refusal(openVhd(lost, openerIn(dir))), ChainBrokenError, /parent cannot be found: tried gone.vhd/);
  tt.match((await checkVhd(lost, openerIn(dir))).problems.join(' '), /parent cannot be found/, 'check reports the missing parent');
  const childFile = await LocalFile.open(child, 'r+');
  const we = await refusal(vhdDriver.openWritable!(childFile, openerIn(dir)));
  await childFile.close();
  oneSentence(tt, we, UsageError, /differencing VHD; imagekeep reads those but does not write into them/);
});

// ---- grow in place ------------------------------------------------------------------------

interface PlannedWrite {
  offset: number;
  data: Buffer;
}

/** Random sector-aligned writes: data and zeros, inside blocks, across blocks, whole blocks, at the end. */
function sessionWrites(seed: number, size: number, blockSize: number, count: number): PlannedWrite[] {
  const rand = prng(seed);
  const r = (n: number) => rand(4).readUInt32LE(0) % n;
  const sectors = size / 512;
  const out: PlannedWrite[] = [];
  for (let i = 0; i < count; i++) {
    const kind = i % 5;
    let start: number;
    let n: number;
    if (kind === 0) {
      start = r(sectors);
      n = 1 + r(64);
    } else if (kind === 1) {
      const boundary = (1 + r(Math.floor(size / blockSize))) * (blockSize / 512);
      n = 2 + r(2 * (blockSize / 512));
      start = Math.max(0, boundary - Math.floor(n / 2));
    } else if (kind === 2) {
      start = r(Math.floor(size / blockSize)) * (blockSize / 512);
      n = blockSize / 512;
    } else if (kind === 3) {
      n = 1 + r(300);
      start = Math.max(0, sectors - n - r(3));
    } else {
      start = r(sectors);
      n = 1 + r(3 * (blockSize / 512));
    }
    n = Math.min(n, sectors - start);
    // One write in four is zeros: into allocated blocks it must land, into holes it must not allocate.
    const data = i % 4 === 3 ? Buffer.alloc(n * 512) : rand(n * 512);
    out.push({ offset: start * 512, data });
  }
  return out;
}

async function growSessions(tt: Test, name: string, size: number, blockSize: number): Promise<void> {
  const vhd = join(work, `${name}.vhd`);
  const raw = join(work, `${name}.raw`);
  await truncate(await (await open(raw, 'w')).close().then(() => raw), size);
  const w0 = await vhdDriver.create!(await LocalFile.open(vhd, 'w'), noSiblings, { size, blockSize, finalName: `${name}.vhd` });
  await w0.close();
  const mirror = await open(raw, 'r+');
  try {
    for (let session = 0; session < 4; session++) {
      const w = await vhdDriver.openWritable!(await LocalFile.open(vhd, 'r+'), noSiblings);
      tt.equal(w.subformat, 'dynamic');
      const writes = sessionWrites(100 + session, size, blockSize, 30);
      for (const [i, wr] of writes.entries()) {
        await w.write(wr.data, wr.offset);
        await mirror.write(wr.data, 0, wr.data.length, wr.offset);
        if (i % 10 === 9) await w.flush();
      }
      // The writer's own view, pending BAT entries included.
      for (const wr of writes.slice(-5)) {
        const got = Buffer.alloc(wr.data.length + 1024);
        const at = Math.max(0, Math.min(wr.offset - 512, size - got.length));
        await w.read(got, at);
        const want = Buffer.alloc(got.length);
        await mirror.read(want, 0, want.length, at);
        if (!got.equals(want)) tt.fail(`session ${session}: the writer reads back ${got.length} at ${at} wrongly`);
      }
      await w.close();
      const report = await checkVhd(vhd);
      tt.same(report.problems, [], `session ${session}: check clean`);
    }
  } finally {
    await mirror.close();
  }
  const cmp = await qemuCompare(raw, vhd, 'vhd');
  tt.equal(cmp.code, 0, `qemu-img compare after four sessions: ${cmp.stdout.trim()}`);
  const lcmp = await libyalCompare(vhd, raw);
  tt.equal(lcmp.code, 0, `libyal-compare: ${lcmp.stdout.trim()}`);
  const d = await openVhd(vhd);
  tt.equal(await differsFromRaw(d, raw), null);
  await d.close();
}

t.test('grow in place: random writes over four sessions equal a raw given the same writes', async (tt) => {
  await tt.test('2 MiB blocks, odd size', (t2) => growSessions(t2, 'grow2m', 40 * MiB + 3 * 512, 2 * MiB));
  await tt.test('64 KiB blocks', (t2) => growSessions(t2, 'grow64k', 12 * MiB, 64 * KiB));
});

t.test('an ascending export is one file write per call; zero stretches stay holes', async (tt) => {
  const size = 32 * MiB;
  const inner = new MemoryFile('count.vhd');
  const ops: string[] = [];
  const counting: RandomAccessFile = {
    path: inner.path,
    size: () => inner.size(),
    read: (b, at) => inner.read(b, at),
    write: (b, at) => (ops.push(`write ${b.length}@${at}`), inner.write(b, at)),
    truncate: (n) => (ops.push(`truncate ${n}`), inner.truncate(n)),
    flush: () => (ops.push('flush'), inner.flush()),
    close: () => inner.close(),
  };
  const w = await vhdDriver.create!(counting, noSiblings, { size, finalName: 'count.vhd' });
  ops.length = 0;
  const data = prng(31)(4 * MiB);
  await w.write(data, 0);
  tt.same(ops, [`write ${4 * MiB + 1024}@${1536 + 512}`], 'two new blocks: bitmap, data, bitmap, data in one write');
  ops.length = 0;
  await w.write(Buffer.alloc(4 * MiB), 4 * MiB);
  tt.same(ops, [], 'all zeros: nothing allocated, nothing written');
  const half = Buffer.concat([prng(32)(MiB), Buffer.alloc(3 * MiB)]);
  await w.write(half, 8 * MiB);
  tt.equal(ops.filter((o) => o.startsWith('write')).length, 1, 'a block with a zero tail: one write...');
  tt.ok(ops.some((o) => o.startsWith('truncate')), '...and the file extended by truncate, not by writing zeros');
  ops.length = 0;
  await w.flush();
  tt.same(ops, ['flush', `write 512@${2048 + 3 * (2 * MiB + 512)}`, 'write 512@1536', 'flush'], 'flush: sync, trailing footer, BAT sector, sync');
  await w.close();
  const d = await vhdDriver.open(new MemoryFile('count.vhd', inner.contents()), noSiblings);
  const got = Buffer.alloc(4 * MiB);
  await d.read(got, 0);
  tt.ok(got.equals(data));
  await d.read(got, 8 * MiB);
  tt.ok(got.equals(half));
});

// ---- crashes ------------------------------------------------------------------------------

t.test('a disk whose trailing footer was cut off is read, then repaired by openWritable', async (tt) => {
  const raw = join(work, 'cut.raw');
  await makeScatteredRaw(raw, 24 * MiB, { seed: 41, count: 4 });
  const vhd = join(work, 'cut.vhd');
  await writeVhd(raw, vhd, 'dynamic');
  const full = (await stat(vhd)).size;
  await truncate(vhd, full - 512);
  const before = await checkVhd(vhd);
  tt.match(before.problems.join(' '), /trailing footer is missing or damaged/);
  const d = await openVhd(vhd);
  tt.equal(await differsFromRaw(d, raw), null, 'our reader uses the copy at 0');
  await d.close();
  tt.not((await libyalCompare(vhd, raw)).code, 0, 'libvhdi needs the trailing footer');
  const w = await vhdDriver.openWritable!(await LocalFile.open(vhd, 'r+'), noSiblings);
  await w.close();
  tt.equal((await stat(vhd)).size, full);
  tt.same((await checkVhd(vhd)).problems, [], 'repaired');
  tt.equal((await libyalCompare(vhd, raw)).code, 0, 'libyal-compare passes after the repair');
  tt.equal((await qemuCompare(raw, vhd, 'vhd')).code, 0);

  // A writer killed after writing new blocks but before its flush: the blocks are in the
  // file, the BAT does not point at them. The repair cuts them off and the footer goes back.
  const probe = await openVhd(vhd);
  const taken = await probe.allocated();
  await probe.close();
  const free = [...Array(12).keys()].find((b) => !taken.some((r) => r.offset < (b + 2) * 2 * MiB && b * 2 * MiB < r.offset + r.length));
  tt.ok(free !== undefined, `blocks ${free} and ${free! + 1} are unallocated`);
  const w2 = await vhdDriver.openWritable!(await LocalFile.open(vhd, 'r+'), noSiblings);
  await w2.write(prng(42)(3 * MiB), free! * 2 * MiB + 512);
  await w2.abort();
  tt.ok((await stat(vhd)).size > full, 'orphan blocks in the file');
  const mid = await checkVhd(vhd);
  tt.ok(mid.problems.length > 0, `check notices: ${mid.problems.join(' ')}`);
  const d2 = await openVhd(vhd);
  tt.equal(await differsFromRaw(d2, raw), null, 'the unflushed writes are not visible');
  await d2.close();
  await (await vhdDriver.openWritable!(await LocalFile.open(vhd, 'r+'), noSiblings)).close();
  tt.equal((await stat(vhd)).size, full, 'the orphans were cut off; their space will be used again');
  tt.same((await checkVhd(vhd)).problems, []);
  tt.equal((await libyalCompare(vhd, raw)).code, 0);
});

class Crash extends Error {}

/** A MemoryFile that dies at its k-th write, truncate or flush, as a killed process would. */
class CrashingFile implements RandomAccessFile {
  steps = 0;
  constructor(readonly inner: MemoryFile, private readonly crashAt: number) {}
  get path() {
    return this.inner.path;
  }
  private step(): void {
    this.steps++;
    if (this.steps >= this.crashAt) throw new Crash(`crash at step ${this.steps}`);
  }
  size() {
    return this.inner.size();
  }
  read(b: Uint8Array, at: number) {
    return this.inner.read(b, at);
  }
  async write(b: Uint8Array, at: number) {
    this.step();
    return this.inner.write(b, at);
  }
  async truncate(n: number) {
    this.step();
    return this.inner.truncate(n);
  }
  async flush() {
    this.step();
  }
  async close() {}
}

t.test('crash at every durable step of a grow session: repaired, sound, every write old or new, flushed writes kept', async (tt) => {
  const size = 6 * MiB + 512;
  const blockSize = 64 * KiB;
  const baseFile = new MemoryFile('base.vhd');
  const w0 = await vhdDriver.create!(baseFile, noSiblings, { size, blockSize, finalName: 'base.vhd' });
  const rand = prng(51);
  for (const at of [0, 5 * 64 * KiB, 40 * 64 * KiB + 1024, size - 4096]) await w0.write(rand(4096), at);
  await w0.close();
  const base = Buffer.from(baseFile.contents());
  const baseDisk = await vhdDriver.open(new MemoryFile('b', base), noSiblings);
  const oldBytes = Buffer.alloc(size);
  await baseDisk.read(oldBytes, 0);

  // In place, new blocks, runs of new blocks, partial new blocks, zeros; a flush in the middle.
  const writes: PlannedWrite[] = [
    { offset: 512, data: rand(1024) },
    { offset: 10 * 64 * KiB, data: rand(3 * 64 * KiB) },
    { offset: 20 * 64 * KiB + 2048, data: rand(8192) },
    { offset: 5 * 64 * KiB + 4096, data: Buffer.alloc(4096) },
    { offset: 30 * 64 * KiB, data: rand(64 * KiB + 512) },
    { offset: 60 * 64 * KiB, data: Buffer.alloc(64 * KiB) },
    { offset: 70 * 64 * KiB - 1024, data: rand(2048) },
    { offset: size - 512, data: rand(512) },
  ];
  const flushAfter = 3;
  let total = 0;
  for (let k = 1; ; k++) {
    const mem = new MemoryFile('s.vhd', base);
    const file = new CrashingFile(mem, k);
    let completed = 0;
    let flushedThrough = 0;
    let crashed = false;
    try {
      const w = await vhdDriver.openWritable!(file, noSiblings);
      for (const [i, wr] of writes.entries()) {
        await w.write(wr.data, wr.offset);
        completed = i + 1;
        if (i + 1 === flushAfter) {
          await w.flush();
          flushedThrough = flushAfter;
        }
      }
      await w.close();
      flushedThrough = writes.length;
    } catch (e) {
      if (!(e instanceof Crash)) throw e;
      crashed = true;
    }
    total = k;
    // Recover as the next process would, and judge.
    const after = new MemoryFile('r.vhd', mem.contents());
    await (await vhdDriver.openWritable!(after, noSiblings)).close();
    const report = await vhdDriver.check(after, noSiblings);
    if (report.problems.length > 0) tt.fail(`crash at step ${k}: ${report.problems.join(' ')}`);
    const d = await vhdDriver.open(after, noSiblings);
    const now = Buffer.alloc(size);
    await d.read(now, 0);
    const expectOld = Buffer.from(oldBytes);
    for (const [i, wr] of writes.entries()) {
      const got = now.subarray(wr.offset, wr.offset + wr.data.length);
      const old = oldBytes.subarray(wr.offset, wr.offset + wr.data.length);
      if (i < flushedThrough) {
        if (!got.equals(wr.data)) tt.fail(`crash at step ${k}: write ${i}, flushed, was lost`);
      } else if (!got.equals(wr.data) && !got.equals(old)) {
        tt.fail(`crash at step ${k}: write ${i} reads neither old nor new`);
      } else if (i >= completed && !got.equals(old)) {
        tt.fail(`crash at step ${k}: write ${i} was never issued yet reads new`);
      }
      got.copy(expectOld, wr.offset);
    }
    if (!now.equals(expectOld)) tt.fail(`crash at step ${k}: bytes outside the writes changed`);
    if (!crashed) break;
  }
  tt.ok(total > 10, `${total - 1} crash points tried, then a clean run`);
});

// ---- bad input ----------------------------------------------------------------------------

async function smallDynamic(blockSize = 2 * MiB): Promise<Buffer> {
  const f = new MemoryFile('small.vhd');
  const w = await vhdDriver.create!(f, noSiblings, { size: 8 * MiB, blockSize, finalName: 'small.vhd' });
  const rand = prng(61);
  await w.write(rand(4096), 0);
  await w.write(rand(8192), 3 * MiB);
  await w.write(rand(512), 8 * MiB - 512);
  await w.close();
  return Buffer.from(f.contents());
}

async function openBytes(bytes: Uint8Array): Promise<DiskImage> {
  return vhdDriver.open(new MemoryFile('bad.vhd', bytes), noSiblings);
}

/** The disk with header fields changed and the header checksum recomputed (so only the lie is wrong). */
function withHeader(disk: Buffer, change: (h: VhdHeader) => void): Buffer {
  const b = Buffer.from(disk);
  const h = decodeHeader(b.subarray(512, 1536));
  change(h);
  encodeHeader(h).copy(b, 512);
  return b;
}

t.test('bad input: typed errors, one sentence each', async (tt) => {
  const good = await smallDynamic();
  const last = good.length - 512;

  oneSentence(tt, await refusal(openBytes(randomBytes(64 * KiB))), ForeignFormatError, /not a VHD: neither its first nor its last 512 bytes/);
  oneSentence(tt, await refusal(openBytes(Buffer.from('conectix'))), CorruptImageError, /is 8 bytes, shorter than the 512-byte VHD footer/);
  oneSentence(tt, await refusal(openBytes(Buffer.alloc(100))), ForeignFormatError, /too short/);
  const qcow = join(work, 'x.qcow2');
  await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '8M']);
  oneSentence(tt, await refusal(openBytes(await readFile(qcow))), ForeignFormatError, /not a VHD/);

  // Truncated below the last block.
  oneSentence(tt, await refusal(openBytes(good.subarray(0, last - MiB))), CorruptImageError, /block \d+ at offset \d+ ends at \d+, past the end of the file \(\d+ bytes\)/);

  // One footer bit-flipped: the other copy serves, check reports it; both: refused.
  const headFlip = Buffer.from(good);
  headFlip[48 + 3]! ^= 0x10;
  const d = await openBytes(headFlip);
  tt.equal(d.size, 8 * MiB, 'the trailing copy serves when the copy at 0 is damaged');
  await d.close();
  tt.match((await vhdDriver.check(new MemoryFile('x', headFlip), noSiblings)).problems.join(' '), /copy at offset 0 is unusable \(its checksum is 0x[0-9a-f]{8} but its bytes sum to 0x[0-9a-f]{8}\)/);
  const repaired = new MemoryFile('x', headFlip);
  await (await vhdDriver.openWritable!(repaired, noSiblings)).close();
  tt.same((await vhdDriver.check(repaired, noSiblings)).problems, [], 'openWritable puts the copy at 0 back');
  const bothFlip = Buffer.from(headFlip);
  bothFlip[last + 48 + 3]! ^= 0x10;
  oneSentence(tt, await refusal(openBytes(bothFlip)), CorruptImageError, /no sound VHD footer: the copy at offset 0 is unusable because its checksum is 0x[0-9a-f]+ .* and the copy in the last 512 bytes because its checksum/);
  const fixedFile = new MemoryFile('f.vhd');
  await (await vhdDriver.create!(fixedFile, noSiblings, { size: MiB, subformat: 'fixed', finalName: 'f.vhd' })).close();
  const fixedFlip = Buffer.from(fixedFile.contents());
  fixedFlip[MiB + 20]! ^= 1;
  oneSentence(tt, await refusal(openBytes(fixedFlip)), CorruptImageError, /no sound VHD footer/);
  oneSentence(tt, await refusal(openBytes(fixedFile.contents().subarray(0, MiB))), ForeignFormatError, /not a VHD/);

  // Header damaged, and header lies with a valid checksum.
  const hdr = Buffer.from(good);
  hdr[600]! ^= 1;
  oneSentence(tt, await refusal(openBytes(hdr)), CorruptImageError, /dynamic disk header at 512 is damaged: its checksum/);
  const lies: [string, (h: VhdHeader) => void, RegExp][] = [
    ['too few BAT entries', (h) => (h.maxTableEntries = 3), /BAT has 3 entries but a 8388608-byte disk of 2097152-byte blocks needs 4/],
    ['a BAT past the end', (h) => (h.maxTableEntries = 0x40000000), /BAT of 1073741824 entries at offset 1536 passes the end of the file/],
    ['BAT offset past the end', (h) => (h.tableOffset = 2 ** 52), /passes the end of the file/],
    ['block size not a power of two', (h) => (h.blockSize = 3 * MiB), /block size 3145728 is not a power of two/],
    ['BAT over the header', (h) => (h.tableOffset = 1024), /overlaps the dynamic header/],
  ];
  for (const [what, change, re] of lies) {
    const e = await refusal(openBytes(withHeader(good, change)));
    oneSentence(tt, e, CorruptImageError, re);
    tt.comment(`${what}: ${e.message}`);
  }
  const tiny = await refusal(openBytes(withHeader(good, (h) => (h.blockSize = 4096))));
  tt.type(tiny, ImagekeepError, `tiny blocks refused: ${tiny.message}`);

  // BAT entries that lie: past the end, overlapping each other, over the metadata.
  const bat = (mutate: (b: Buffer) => void) => {
    const b = Buffer.from(good);
    mutate(b.subarray(1536, 1536 + 16));
    return b;
  };
  oneSentence(tt, await refusal(openBytes(bat((b) => b.writeUInt32BE(0x7fffffff, 4)))), CorruptImageError, /block 1 at offset 1099511627264 ends at \d+, past the end of the file/);
  const firstEntry = good.readUInt32BE(1536);
  oneSentence(tt, await refusal(openBytes(bat((b) => b.writeUInt32BE(firstEntry + 1, 4)))), CorruptImageError, /blocks \d+ \(at offset \d+\) and \d+ \(at offset \d+\) overlap, each taking 2097664 bytes/);
  oneSentence(tt, await refusal(openBytes(bat((b) => b.writeUInt32BE(2, 4)))), CorruptImageError, /block 1 at offset 1024 overlaps the dynamic header/);

  // Footer sizes that lie (valid checksums).
  const footerLie = (change: (f: ReturnType<typeof decodeFooter>) => void) => {
    const b = Buffer.from(good);
    const f = decodeFooter(b.subarray(0, 512));
    change(f);
    const bytes = encodeFooter(f);
    bytes.copy(b, 0);
    bytes.copy(b, last);
    return b;
  };
  oneSentence(tt, await refusal(openBytes(footerLie((f) => (f.currentSize = 3000 * GiB)))), CorruptImageError, /virtual size of 3221225472000 bytes, above the VHD limit of 2040 GiB/);
  oneSentence(tt, await refusal(openBytes(footerLie((f) => (f.currentSize = 8 * MiB + 100)))), CorruptImageError, /not a multiple of 512/);
  oneSentence(tt, await refusal(openBytes(footerLie((f) => (f.currentSize = 64 * MiB)))), CorruptImageError, /BAT has 4 entries but a 67108864-byte disk/);
  oneSentence(tt, await refusal(openBytes(footerLie((f) => (f.diskType = 5)))), ImagekeepError, /disk type 5/);

  // Reads and writes outside the disk are caller errors.
  const ok = await openBytes(good);
  await tt.rejects(ok.read(Buffer.alloc(1024), 8 * MiB - 512), RangeError);
  await ok.close();
});

type Allocator = (size: number, ...rest: never[]) => Buffer;

/** Makes Buffer's allocators refuse sizes above `max` (a size field believed without a bound); returns the undo. */
function guardAllocations(max: number): () => void {
  const names = ['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const;
  const table = Buffer as unknown as Record<string, Allocator>;
  const saved = names.map((n) => table[n]!);
  names.forEach((n, i) => {
    table[n] = (size: number, ...rest: never[]) => {
      if (size > max) throw new Error(`Buffer.${n}(${size}) exceeds the test's bound of ${max} bytes`);
      return saved[i]!.call(Buffer, size, ...rest);
    };
  });
  return () => names.forEach((n, i) => (table[n] = saved[i]!));
}

t.test('mutated disks: only typed errors, bounded memory, quickly', async (tt) => {
  // 64 KiB blocks keep the seed small (each case copies it).
  const seeds = [await smallDynamic(64 * KiB)];
  const fixed = new MemoryFile('f.vhd');
  const fw = await vhdDriver.create!(fixed, noSiblings, { size: 128 * KiB, subformat: 'fixed', finalName: 'f.vhd' });
  await fw.write(Buffer.alloc(512, 7), 0);
  await fw.close();
  seeds.push(Buffer.from(fixed.contents()));
  const rand = prng(71);
  const r = (n: number) => rand(4).readUInt32LE(0) % n;
  const values = [0xffffffff, 0x7fffffff, 0x80000000, 0, 1, 512, 0xfffffffe];
  let opened = 0;
  let refused = 0;
  const started = Date.now();
  const unguard = guardAllocations(64 * MiB);
  tt.teardown(unguard);
  for (let c = 0; c < 1200; c++) {
    const seed = seeds[c % seeds.length]!;
    const b = Buffer.from(seed);
    // Mutate metadata: the footers, the header, the BAT.
    const regions = c % 2 === 0 ? [[0, 2048], [b.length - 512, b.length]] : [[b.length - 512, b.length]];
    for (let m = 0; m < 1 + r(3); m++) {
      const [lo, hi] = regions[r(regions.length)]!;
      const at = lo! + r(hi! - lo!);
      if (r(2) === 0) b[at]! ^= 1 << r(8);
      else if (at + 4 <= b.length) b.writeUInt32BE(values[r(values.length)]!, at - (at % 4));
    }
    // Fix the checksums half the time, so the lies reach the deeper checks.
    // (Fields mutated past what the codec can write back, a 64-bit offset above 2^53, stay unfixed.)
    try {
      if (r(2) === 0 && b.subarray(0, 8).toString('latin1') === 'conectix') {
        encodeFooter(decodeFooter(b.subarray(0, 512))).copy(b, 0);
        if (c % 2 === 0 && b.subarray(512, 520).toString('latin1') === 'cxsparse') encodeHeader(decodeHeader(b.subarray(512, 1536))).copy(b, 512);
      }
    } catch (e) {
      if (!(e instanceof RangeError)) throw e;
    }
    const file = new MemoryFile('m.vhd', r(10) === 0 ? b.subarray(0, r(b.length)) : b);
    let disk: DiskImage | null = null;
    try {
      disk = await vhdDriver.open(file, noSiblings);
      const buf = Buffer.alloc(64 * KiB);
      for (const range of (await disk.allocated()).slice(0, 4)) await disk.read(buf.subarray(0, Math.min(buf.length, range.length)), range.offset);
      await disk.read(buf.subarray(0, Math.min(4096, disk.size)), 0);
      await vhdDriver.check(file, noSiblings);
      opened++;
    } catch (e) {
      if (e instanceof ImagekeepError) refused++;
      else tt.fail(`case ${c}: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
    } finally {
      await disk?.close();
    }
  }
  unguard();
  tt.ok(opened > 100 && refused > 100, `${opened} opened, ${refused} refused with typed errors, in ${Date.now() - started} ms`);
});

t.test('probe: a VHD footer at the start (dynamic) or the end (fixed)', async (tt) => {
  const dyn = await smallDynamic();
  tt.equal(vhdDriver.probe(dyn.subarray(0, 64 * KiB), dyn.subarray(dyn.length - 512)), 100);
  const fixed = new MemoryFile('f.vhd');
  await (await vhdDriver.create!(fixed, noSiblings, { size: MiB, subformat: 'fixed', finalName: 'f.vhd' })).close();
  const fb = fixed.contents();
  tt.equal(vhdDriver.probe(fb.subarray(0, 64 * KiB), fb.subarray(fb.length - 512)), 100);
  const junk = randomBytes(64 * KiB);
  tt.equal(vhdDriver.probe(junk, junk.subarray(0, 512)), 0);
  const qcow = join(work, 'p.qcow2');
  await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '8M']);
  const q = await readFile(qcow);
  tt.equal(vhdDriver.probe(q.subarray(0, 64 * KiB), q.subarray(q.length - 512)), 0);
});
