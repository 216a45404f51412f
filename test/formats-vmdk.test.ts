// Proves our VMDK codec writes monolithicSparse, streamOptimized, monolithicFlat and vmfs disks that qemu-img and libvmdk read byte-identically and check clean (1 GiB, an odd size, a 2 TiB disk), reads qemu's and VMware's VMDKs as qemu does, grows sparse and vmfs disks in place, stays within 5% of python3-vmdkstream's size, and refuses bad input (afl9, truncation, bit flips, short flat files) with typed one-line errors.
import t, { type Test } from 'tap';
import { copyFile, open, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { DiskImage, DiskWriter, FileOpener, StructureReport } from '../src/formats/disk-image.js';
import { CorruptImageError, ForeignFormatError, ImagekeepError, UnsupportedVersionError, UsageError } from '../src/formats/errors.js';
import { LocalFile } from '../src/formats/local-file.js';
import { MemoryFile } from '../src/formats/memory-file.js';
import type { ByteRange } from '../src/formats/types.js';
import { vmdkDriver } from '../src/formats/vmdk/index.js';
import { parseDescriptor, parseSparseHeader } from '../src/formats/vmdk/codec.js';
import { Rng } from '../src/bench/common.js';
import { TextGen } from '../src/bench/datagen.js';
import {
  SAMPLES,
  libyalCompare,
  libyalInfo,
  makeScatteredRaw,
  qemuCheck,
  qemuCompare,
  qemuConvert,
  qemuInfo,
  qemuToRaw,
  runTool,
  type ScatteredDisk,
} from './helpers/disk-tools.js';
import { ROOT, prng, tempDir } from './helpers/cli.js';

const { dir: work, cleanup } = await tempDir('vmdk');
t.teardown(cleanup);

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const GRAIN = 64 * KiB;

const opener: FileOpener = (name, mode) => LocalFile.open(isAbsolute(name) ? name : join(work, name), mode);

/** The union of possibly overlapping extents, ascending: what a copy that skips holes writes. */
function mergeRanges(extents: readonly ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    const last = out[out.length - 1];
    if (last && e.offset <= last.offset + last.length) last.length = Math.max(last.length, e.offset + e.length - last.offset);
    else out.push({ ...e });
  }
  return out;
}

/** Copies the data ranges of a raw file into a writer, ascending, in pieces of at most 4 MiB (as callers do). */
async function copyRaw(raw: string, ranges: readonly ByteRange[], writer: DiskWriter): Promise<void> {
  const f = await open(raw, 'r');
  try {
    for (const r of ranges) {
      for (let off = r.offset; off < r.offset + r.length; off += 4 * MiB) {
        const n = Math.min(4 * MiB, r.offset + r.length - off);
        const buf = Buffer.alloc(n);
        await f.read(buf, 0, n, off);
        await writer.write(buf, off);
      }
    }
  } finally {
    await f.close();
  }
}

async function createDisk(name: string, size: number, subformat: string): Promise<DiskWriter> {
  const file = await LocalFile.open(join(work, name), 'w');
  return vmdkDriver.create!(file, opener, { size, subformat, finalName: name });
}

async function openDisk(name: string): Promise<DiskImage> {
  return vmdkDriver.open(await LocalFile.open(join(work, name), 'r'), opener);
}

async function checkDisk(name: string): Promise<StructureReport> {
  const file = await LocalFile.open(join(work, name), 'r');
  try {
    return await vmdkDriver.check(file, opener);
  } finally {
    await file.close();
  }
}

/** Reads the whole disk through our reader and compares it with a raw file, 4 MiB at a time; returns the first differing offset or -1. */
async function firstDifference(image: DiskImage, raw: string): Promise<number> {
  const f = await open(raw, 'r');
  try {
    const a = Buffer.alloc(4 * MiB);
    const b = Buffer.alloc(4 * MiB);
    for (let off = 0; off < image.size; off += a.length) {
      const n = Math.min(a.length, image.size - off);
      await image.read(a.subarray(0, n), off);
      await f.read(b, 0, n, off);
      if (!a.subarray(0, n).equals(b.subarray(0, n))) {
        for (let i = 0; i < n; i++) if (a[i] !== b[i]) return off + i;
      }
    }
    return -1;
  } finally {
    await f.close();
  }
}

/** What the real tools and our own check say about one of our disks against its raw. */
async function assertMatchesRaw(tt: Test, name: string, raw: string, size: number, createType: string): Promise<void> {
  const path = join(work, name);
  const cmp = await qemuCompare(raw, path, 'vmdk');
  tt.equal(cmp.code, 0, `qemu-img compare: identical (${cmp.stdout.trim()}${cmp.stderr.trim()})`);
  tt.notMatch(cmp.stdout + cmp.stderr, /size mismatch/i, 'no size mismatch warning');
  const chk = await qemuCheck(path, 'vmdk');
  tt.equal(chk.code, 0, `qemu-img check clean ${chk.stdout.trim()}${chk.stderr.trim()}`);
  const info = await qemuInfo(path, 'vmdk');
  tt.equal(info['virtual-size'], size, 'qemu-img info: exact size');
  tt.equal(info.format, 'vmdk');
  tt.equal(info['format-specific']?.data['create-type'], createType, `qemu-img info: create type ${createType}`);
  const yal = await libyalInfo(path, 'vmdk');
  tt.equal(yal.code, 0, `vmdkinfo parses it ${yal.stderr.trim()}`);
  tt.match(yal.stdout, new RegExp(`Media size:.*\\(${size} bytes\\)`), 'vmdkinfo: media size');
  const ycmp = await libyalCompare(path, raw);
  tt.equal(ycmp.code, 0, `libyal-compare: identical (${ycmp.stdout.trim()})`);
  const report = await checkDisk(name);
  tt.same(report.problems, [], 'our check: clean');
  tt.equal(report.layout.virtualSize, size, 'our check: virtual size');
  tt.equal(report.layout.createType, createType, 'our check: createType');
  const image = await openDisk(name);
  try {
    tt.equal(image.size, size);
    tt.equal(image.subformat, createType);
    tt.equal(await firstDifference(image, raw), -1, 'our reader = raw');
  } finally {
    await image.close();
  }
}

const SUBFORMATS = ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'vmfs'] as const;

const sizes: { label: string; size: number; seed: number }[] = [
  { label: '1 GiB', size: GiB, seed: 11 },
  { label: '1 GiB + 7 sectors (not a whole grain)', size: GiB + 7 * 512, seed: 12 },
];
const raws = new Map<number, { path: string; disk: ScatteredDisk }>();
for (const s of sizes) {
  const path = join(work, `scattered-${s.seed}.raw`);
  raws.set(s.size, { path, disk: await makeScatteredRaw(path, s.size, { seed: s.seed }) });
}

for (const sub of SUBFORMATS) {
  t.test(`${sub}: our disks read identically by qemu-img and libvmdk`, async (tt) => {
    for (const s of sizes) {
      const { path: raw, disk } = raws.get(s.size)!;
      const name = `${sub}-${s.seed}.vmdk`;
      const t0 = performance.now();
      const writer = await createDisk(name, s.size, sub);
      tt.equal(writer.size, s.size);
      await copyRaw(raw, mergeRanges(disk.extents), writer);
      await writer.close();
      tt.comment(`${s.label}: written in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
      await assertMatchesRaw(tt, name, raw, s.size, sub);
      if (sub === 'monolithicFlat' || sub === 'vmfs') {
        const flat = await stat(join(work, name.replace(/\.vmdk$/, '-flat.vmdk')));
        tt.equal(flat.size, s.size, 'the flat file is exactly the disk size');
        tt.ok(flat.blocks * 512 < s.size / 4, `the flat file stays sparse (${flat.blocks * 512} bytes used)`);
        const text = await readFile(join(work, name), 'utf8');
        tt.ok(text.startsWith('# Disk DescriptorFile\n'), 'descriptor signature');
        tt.match(text, sub === 'vmfs' ? /\nRW \d+ VMFS "vmfs-\d+-flat\.vmdk"\n/ : /\nRW \d+ FLAT "monolithicFlat-\d+-flat\.vmdk" 0\n/);
      }
    }
  });
}

t.test('a 2 TiB monolithicSparse disk holding a few grains', async (tt) => {
  const size = 2 * TiB;
  const name = 'big.vmdk';
  let t0 = performance.now();
  const lap = (what: string) => {
    tt.comment(`${what}: ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    t0 = performance.now();
  };
  const writer = await createDisk(name, size, 'monolithicSparse');
  // grains filled with one byte each, at edges that break 32-bit arithmetic
  const places: { offset: number; byte: number; length: number }[] = [
    { offset: 0, byte: 0x11, length: GRAIN },
    { offset: 2 ** 31 - GRAIN, byte: 0x22, length: 2 * GRAIN },
    { offset: 2 ** 32 + 7 * 512, byte: 0x33, length: 3 * 512 },
    { offset: TiB + 5 * GRAIN, byte: 0x44, length: GRAIN },
    { offset: 2 ** 40 + 2 ** 39 + 32 * MiB - GRAIN, byte: 0x55, length: 2 * GRAIN },
    { offset: size - GRAIN, byte: 0x66, length: GRAIN },
  ];
  for (const p of places) await writer.write(Buffer.alloc(p.length, p.byte), p.offset);
  const back = Buffer.alloc(3 * 512);
  await writer.read(back, 2 ** 32 + 7 * 512);
  tt.ok(back.equals(Buffer.alloc(3 * 512, 0x33)), 'the writer reads back before flush');
  await writer.close();

  const path = join(work, name);
  const st = await stat(path);
  tt.ok(st.blocks * 512 < 4 * MiB, `the 256 MiB of preallocated tables cost no space (${st.blocks * 512} bytes used)`);
  lap('created and written');
  const info = await qemuInfo(path, 'vmdk');
  tt.equal(info['virtual-size'], size, 'qemu-img info: 2 TiB');
  const report = await checkDisk(name);
  lap('our check');
  tt.same(report.problems, [], 'our check: clean');
  tt.equal(report.layout.virtualSize, info['virtual-size'], 'our check agrees with qemu on the size');
  tt.equal(report.layout.grainSize, info['cluster-size'], 'and on the grain size');
  tt.equal(report.layout.gtCount, 65536, '65536 grain tables of 32 MiB');
  tt.equal(report.layout.allocatedGrains, 8, 'eight grains stored');

  const image = await openDisk(name);
  const rand = prng(21);
  const commands: string[] = [];
  try {
    const alloc = await image.allocated();
    tt.same(
      alloc.map((r) => [r.offset, r.length]),
      [
        [0, GRAIN],
        [2 ** 31 - GRAIN, 2 * GRAIN],
        [2 ** 32, GRAIN],
        [TiB + 5 * GRAIN, GRAIN],
        [2 ** 40 + 2 ** 39 + 32 * MiB - GRAIN, 2 * GRAIN],
        [size - GRAIN, GRAIN],
      ],
      'allocated() lists the grains',
    );
    for (const p of places) {
      const grainStart = Math.floor(p.offset / GRAIN) * GRAIN;
      const whole = Buffer.alloc(Math.ceil((p.offset + p.length - grainStart) / GRAIN) * GRAIN);
      await image.read(whole, grainStart);
      const want = Buffer.alloc(whole.length);
      want.fill(p.byte, p.offset - grainStart, p.offset - grainStart + p.length);
      tt.ok(whole.equals(want), `grain(s) at ${grainStart}: ${p.byte.toString(16)} where written, zeros around`);
      commands.push('-c', `read -P 0x${p.byte.toString(16)} ${p.offset} ${p.length}`);
    }
    for (let i = 0; i < 12; i++) {
      const off = Number(rand(8).readBigUInt64LE(0) % BigInt(size / GRAIN)) * GRAIN;
      if (places.some((p) => off + GRAIN > Math.floor(p.offset / GRAIN) * GRAIN && off < p.offset + p.length + GRAIN)) continue;
      const buf = Buffer.alloc(GRAIN, 1);
      await image.read(buf, off);
      tt.ok(buf.equals(Buffer.alloc(GRAIN)), `unwritten grain at ${off} reads as zeros`);
      commands.push('-c', `read -P 0 ${off} ${GRAIN}`);
    }
  } finally {
    await image.close();
  }
  lap('our reads');
  const io = await runTool('qemu-io', ['-f', 'vmdk', '-r', ...commands, path]);
  tt.equal(io.code, 0, 'qemu-io reads the same patterns');
  tt.notMatch(io.stdout + io.stderr, /Pattern verification failed/);
  lap('qemu-io reads');
});

t.test('disks made by qemu-img read byte-identically to qemu-img convert -O raw', async (tt) => {
  const raw = join(work, 'reverse.raw');
  await makeScatteredRaw(raw, 256 * MiB + 3 * 512, { seed: 31 });
  for (const sub of ['monolithicSparse', 'streamOptimized', 'monolithicFlat']) {
    const name = `qemu-${sub}.vmdk`;
    const path = join(work, name);
    const conv = await qemuConvert(raw, path, 'vmdk', `subformat=${sub}`);
    tt.equal(conv.code, 0, `qemu-img convert -o subformat=${sub}`);
    const theirs = join(work, `qemu-${sub}.raw`);
    tt.equal((await qemuToRaw(path, 'vmdk', theirs)).code, 0);
    const image = await openDisk(name);
    try {
      tt.equal(image.subformat, sub);
      tt.equal(image.size, (await stat(theirs)).size, 'same size as qemu reads');
      tt.equal(await firstDifference(image, theirs), -1, `${sub} by qemu: our reader = qemu's`);
    } finally {
      await image.close();
    }
    tt.same((await checkDisk(name)).problems, [], `our check: qemu's ${sub} is clean`);

    const empty = `qemu-empty-${sub}.vmdk`;
    const made = await runTool('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, join(work, empty), '100M']);
    tt.equal(made.code, 0);
    const e = await openDisk(empty);
    try {
      const buf = Buffer.alloc(MiB, 1);
      await e.read(buf, 99 * MiB);
      tt.ok(buf.equals(Buffer.alloc(MiB)), `an empty ${sub} from qemu-img create reads as zeros`);
      tt.same(await e.allocated(), sub === 'monolithicFlat' ? [{ offset: 0, length: 100 * MiB }] : [], 'allocated()');
    } finally {
      await e.close();
    }
  }

  // split disks: a descriptor naming several 2 GiB extents, data across the boundary between two
  for (const sub of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    const name = `split-${sub}.vmdk`;
    const path = join(work, name);
    tt.equal((await runTool('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, path, '2560M'])).code, 0);
    const io = await runTool('qemu-io', ['-f', 'vmdk', '-c', `write -P 0x5a ${2 * GiB - 1536} 4096`, '-c', `write -P 0xa5 ${2560 * MiB - 512} 512`, path]);
    tt.equal(io.code, 0, `qemu-io writes into the ${sub} disk`);
    const split = await openDisk(name);
    try {
      tt.equal(split.size, 2560 * MiB);
      const a = Buffer.alloc(8192);
      await split.read(a, 2 * GiB - 4096);
      const want = Buffer.alloc(8192);
      want.fill(0x5a, 4096 - 1536, 4096 - 1536 + 4096);
      tt.ok(a.equals(want), `${sub}: a write across the extent boundary reads back`);
      const b = Buffer.alloc(1024);
      await split.read(b, 2560 * MiB - 1024);
      tt.ok(b.subarray(512).equals(Buffer.alloc(512, 0xa5)) && b.subarray(0, 512).equals(Buffer.alloc(512)), `${sub}: the last sector`);
      if (sub === 'twoGbMaxExtentSparse') {
        tt.same(
          (await split.allocated()).map((r) => [r.offset, r.length]),
          [[2 * GiB - GRAIN, 2 * GRAIN], [2560 * MiB - GRAIN, GRAIN]],
          'allocated() across the extents',
        );
      }
    } finally {
      await split.close();
    }
    tt.same((await checkDisk(name)).problems, [], `our check: qemu's ${sub} is clean`);
  }

  // a vmfs descriptor written by hand, as formats.md §3.3 gives it
  await copyFile(raw, join(work, 'hand-flat.vmdk'));
  const sectors = (256 * MiB + 3 * 512) / 512;
  await writeFile(
    join(work, 'hand.vmdk'),
    `# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\nRW ${sectors} VMFS "hand-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\nddb.thinProvisioned = "1"\n`,
  );
  const hand = await openDisk('hand.vmdk');
  try {
    tt.equal(hand.subformat, 'vmfs');
    tt.equal(await firstDifference(hand, raw), -1, 'hand-written vmfs descriptor: our reader = raw');
  } finally {
    await hand.close();
  }
  tt.equal((await qemuCompare(raw, join(work, 'hand.vmdk'), 'vmdk')).code, 0, 'and qemu agrees');
});

t.test("VMware's streamOptimized sample (iotest-version3) reads exactly as qemu-img reads it", async (tt) => {
  // the sample's descriptor names its extent generated-stream.vmdk; libvmdk and our check want that name
  const name = 'generated-stream.vmdk';
  const path = join(work, name);
  const unpacked = await runTool('sh', ['-c', `bzcat '${join(SAMPLES, 'iotest-version3.vmdk.bz2')}' > '${path}'`]);
  tt.equal(unpacked.code, 0);
  const header = parseSparseHeader(await readFile(path).then((b) => b.subarray(0, 512)));
  tt.equal(header.version, 3);
  tt.ok(header.gdAtEnd, 'GD_AT_END: the grain directory is found through the footer');
  const image = await openDisk(name);
  const ours = join(work, 'v3-ours.raw');
  try {
    tt.equal(image.subformat, 'streamOptimized');
    tt.equal(image.size, 16 * GiB);
    // a raw image of what we read: only our allocated ranges are written, the rest stays a hole;
    // qemu-img compare then checks every byte, holes included, against its own reading
    const out = await open(ours, 'w');
    await out.truncate(image.size);
    const alloc = await image.allocated();
    for (const r of alloc) {
      const buf = Buffer.alloc(r.length);
      await image.read(buf, r.offset);
      await out.write(buf, 0, buf.length, r.offset);
    }
    await out.close();
    const map = JSON.parse((await runTool('qemu-img', ['map', '--output=json', '-f', 'vmdk', path])).stdout) as { start: number; length: number; data: boolean }[];
    const theirs = mergeRanges(map.filter((m) => m.data).map((m) => ({ offset: m.start, length: m.length })));
    tt.same(alloc, theirs, 'allocated() = the data ranges of qemu-img map');
  } finally {
    await image.close();
  }
  const cmp = await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', ours, path]);
  tt.equal(cmp.code, 0, `qemu-img compare: identical (${cmp.stdout.trim()})`);
  const report = await checkDisk(name);
  tt.same(report.problems, [], 'our check: clean');
  tt.equal(report.layout.allocatedGrains, 151);
});

t.test('afl9 (a grain directory size that lies) is refused with one clear line, fast', async (tt) => {
  const name = 'afl9.vmdk';
  const path = join(work, name);
  tt.equal((await runTool('sh', ['-c', `bzcat '${join(SAMPLES, 'afl9.vmdk.bz2')}' > '${path}'`])).code, 0);
  const t0 = performance.now();
  const err = await openDisk(name).then(
    () => null,
    (e: unknown) => e,
  );
  const ms = performance.now() - t0;
  tt.type(err, CorruptImageError);
  const msg = (err as Error).message;
  tt.notMatch(msg, /\n/, 'one line');
  tt.match(msg, /capacity is \d+, beyond any real disk/);
  tt.ok(ms < 200, `refused in ${ms.toFixed(1)} ms`);
  tt.comment(msg);
  const head = await readFile(path);
  tt.equal(vmdkDriver.probe(head.subarray(0, 65536), head.subarray(head.length - 512)), 100, 'still probed as a VMDK');
  const report = await checkDisk(name);
  tt.equal(report.problems.length, 1);
  tt.match(report.problems[0]!, /beyond any real disk/);
});

t.test('streamOptimized side by side with python3-vmdkstream', async (tt) => {
  // mixed content, 1 MiB each in turn: random (incompressible), generated text, real source
  // code (TypeScript's compiler, the most compressible), zeros
  const size = 48 * MiB;
  const raw = join(work, 'mixed.raw');
  const f = await open(raw, 'w');
  const rng = new Rng(5);
  const text = new TextGen(rng);
  const rand = prng(6);
  const source = await readFile(join(ROOT, 'node_modules/typescript/lib/typescript.js'));
  const buf = Buffer.alloc(MiB);
  for (let off = 0, i = 0; off < size; off += MiB, i++) {
    const kind = i % 4;
    if (kind === 0) await f.write(rand(MiB), 0, MiB, off);
    else if (kind === 1) {
      text.fill(buf);
      await f.write(buf, 0, MiB, off);
    } else if (kind === 2) await f.write(source, (i * MiB) % (source.length - MiB), MiB, off);
  }
  await f.truncate(size);
  await f.close();

  const py = join(work, 'py-stream.vmdk');
  let t0 = performance.now();
  const conv = await runTool('/usr/bin/python3', ['-c', `import VMDKstream; VMDKstream.convert_to_stream(${JSON.stringify(raw)}, ${JSON.stringify(py)})`]);
  const pySeconds = (performance.now() - t0) / 1000;
  tt.equal(conv.code, 0, `vmdkstream ran ${conv.stderr}`);

  t0 = performance.now();
  const writer = await createDisk('ours-stream.vmdk', size, 'streamOptimized');
  const rf = await open(raw, 'r');
  for (let off = 0; off < size; off += 4 * MiB) {
    const chunk = Buffer.alloc(4 * MiB);
    await rf.read(chunk, 0, chunk.length, off);
    await writer.write(chunk, off);
  }
  await rf.close();
  await writer.close();
  const ourSeconds = (performance.now() - t0) / 1000;

  const ourSize = (await stat(join(work, 'ours-stream.vmdk'))).size;
  const pySize = (await stat(py)).size;
  tt.comment(`streamOptimized of ${size / MiB} MiB mixed: ours ${ourSize} bytes in ${ourSeconds.toFixed(2)} s, vmdkstream ${pySize} bytes in ${pySeconds.toFixed(2)} s`);
  tt.ok(ourSize <= pySize * 1.05, `ours (${ourSize}) is no more than 5% larger than vmdkstream's (${pySize})`);
  tt.equal((await qemuCompare(raw, py, 'vmdk')).code, 0, "qemu-img reads vmdkstream's output as the raw");
  tt.equal((await qemuCompare(raw, join(work, 'ours-stream.vmdk'), 'vmdk')).code, 0, 'and ours');
  const image = await openDisk('py-stream.vmdk');
  try {
    tt.equal(await firstDifference(image, raw), -1, "our reader reads vmdkstream's output");
  } finally {
    await image.close();
  }
  const report = await checkDisk('py-stream.vmdk');
  tt.match(report.problems.join('\n'), /first line is "# Disk Descriptor File"/, "our check names vmdkstream's descriptor line, which libvmdk refuses");
});

/** Random sector-aligned writes: inside a grain, across grains, whole grains, at the very end. */
function sessionWrites(seed: number, size: number, count: number): { offset: number; data: Buffer }[] {
  const rand = prng(seed);
  const sectors = size / 512;
  const out: { offset: number; data: Buffer }[] = [];
  for (let i = 0; i < count; i++) {
    const r = rand(8);
    const n = 1 + (r.readUInt16LE(0) % 300);
    let start = Number(r.readUInt32LE(2) % sectors);
    if (i % 4 === 1) start = Math.max(0, Math.floor(start / 128) * 128 - 3);
    if (i % 4 === 2) start = Math.floor(start / 128) * 128;
    if (i % 4 === 3) start = sectors - n;
    start = Math.min(start, sectors - n);
    // some writes are zeros: into unallocated grains they must not allocate, over data they must land
    const data = i % 7 === 0 ? Buffer.alloc(n * 512) : rand(n * 512);
    out.push({ offset: start * 512, data });
  }
  return out;
}

for (const sub of ['monolithicSparse', 'vmfs'] as const) {
  t.test(`${sub}: grown in place over several sessions matches a raw given the same writes`, async (tt) => {
    const size = 96 * MiB + 5 * 512;
    const name = `grow-${sub}.vmdk`;
    const raw = join(work, `grow-${sub}.raw`);
    const base = await makeScatteredRaw(raw, size, { seed: 41, count: 40 });
    const writer = await createDisk(name, size, sub);
    await copyRaw(raw, mergeRanges(base.extents), writer);
    await writer.close();
    const cidBefore = (await qemuInfo(join(work, name), 'vmdk'))['format-specific']?.data.cid;

    const rawFile = await open(raw, 'r+');
    try {
      for (let session = 0; session < 4; session++) {
        const file = await LocalFile.open(join(work, name), 'r+');
        const w = await vmdkDriver.openWritable!(file, opener);
        tt.equal(w.size, size);
        const writes = sessionWrites(100 + session, size, 60);
        for (let i = 0; i < writes.length; i++) {
          const { offset, data } = writes[i]!;
          await w.write(data, offset);
          await rawFile.write(data, 0, data.length, offset);
          if (i === 30) await w.flush();
        }
        const probe = writes[writes.length - 1]!;
        const back = Buffer.alloc(probe.data.length);
        await w.read(back, probe.offset);
        tt.ok(back.equals(probe.data), `session ${session}: the writer reads its last write back`);
        await w.close();
      }
    } finally {
      await rawFile.close();
    }
    const path = join(work, name);
    tt.equal((await qemuCompare(raw, path, 'vmdk')).code, 0, 'qemu-img compare: identical to the raw');
    tt.equal((await qemuCheck(path, 'vmdk')).code, 0, 'qemu-img check clean');
    tt.equal((await libyalCompare(path, raw)).code, 0, 'libvmdk reads the same');
    tt.same((await checkDisk(name)).problems, [], 'our check: clean (GTE = redundant GTE, grains in the file)');
    const cidAfter = (await qemuInfo(path, 'vmdk'))['format-specific']?.data.cid;
    tt.not(cidAfter, cidBefore, 'the CID changed with the content');
    const image = await openDisk(name);
    try {
      tt.equal(await firstDifference(image, raw), -1, 'our reader = raw');
    } finally {
      await image.close();
    }
  });
}

t.test('a monolithicSparse disk made by qemu-img grows in place too', async (tt) => {
  const size = 64 * MiB;
  const raw = join(work, 'qgrow.raw');
  const base = await makeScatteredRaw(raw, size, { seed: 51, count: 30 });
  const path = join(work, 'qgrow.vmdk');
  tt.equal((await qemuConvert(raw, path, 'vmdk', 'subformat=monolithicSparse')).code, 0);
  tt.ok(base.extents.length > 0);
  const w = await vmdkDriver.openWritable!(await LocalFile.open(path, 'r+'), opener);
  const rawFile = await open(raw, 'r+');
  for (const { offset, data } of sessionWrites(7, size, 80)) {
    await w.write(data, offset);
    await rawFile.write(data, 0, data.length, offset);
  }
  await rawFile.close();
  await w.close();
  tt.equal((await qemuCompare(raw, path, 'vmdk')).code, 0, 'qemu-img compare: identical');
  tt.equal((await qemuCheck(path, 'vmdk')).code, 0, 'qemu-img check clean');
  tt.same((await checkDisk('qgrow.vmdk')).problems, []);
});

t.test('new grains stay unreachable until flush (the DiskWriter crash contract)', async (tt) => {
  const name = 'crash.vmdk';
  const w = await createDisk(name, 32 * MiB, 'monolithicSparse');
  await w.write(Buffer.alloc(GRAIN, 0x77), 0);
  await w.flush();
  const w2 = await vmdkDriver.openWritable!(await LocalFile.open(join(work, name), 'r+'), opener);
  await w2.write(Buffer.alloc(GRAIN, 0x88), 4 * GRAIN);
  await w2.write(Buffer.alloc(512, 0x99), 0);
  await w2.abort();
  // the new grain's data reached the file, its table entry did not; the in-place write did
  const image = await openDisk(name);
  try {
    const a = Buffer.alloc(GRAIN);
    await image.read(a, 4 * GRAIN);
    tt.ok(a.equals(Buffer.alloc(GRAIN)), 'the unflushed grain is not reachable');
    const b = Buffer.alloc(1024);
    await image.read(b, 0);
    tt.ok(b.subarray(0, 512).equals(Buffer.alloc(512, 0x99)) && b.subarray(512).equals(Buffer.alloc(512, 0x77)), 'a write into an allocated grain goes in place');
  } finally {
    await image.close();
  }
  tt.equal((await qemuCheck(join(work, name), 'vmdk')).code, 0, 'qemu-img check clean after the abort');
  tt.same((await checkDisk(name)).problems, []);
  // the next session appends after the orphan grain, never over it
  const w3 = await vmdkDriver.openWritable!(await LocalFile.open(join(work, name), 'r+'), opener);
  await w3.write(Buffer.alloc(GRAIN, 0xaa), 8 * GRAIN);
  await w3.close();
  tt.same((await checkDisk(name)).problems, [], 'no overlap with the orphan');
});

t.test('writers refuse misuse with UsageError', async (tt) => {
  const s = await createDisk('misuse-stream.vmdk', 8 * MiB, 'streamOptimized');
  await s.write(Buffer.alloc(GRAIN, 1), 2 * GRAIN);
  await tt.rejects(s.write(Buffer.alloc(GRAIN, 1), GRAIN), UsageError, 'a stream write that goes backwards');
  await tt.rejects(s.write(Buffer.alloc(100), 4 * GRAIN), UsageError, 'a write that is not whole sectors');
  await tt.rejects(s.write(Buffer.alloc(512), 8 * MiB), UsageError, 'a write past the end');
  // a partial grain waits for the rest of its bytes
  await s.write(Buffer.alloc(512, 2), 3 * GRAIN + 512);
  await s.write(Buffer.alloc(1024, 3), 3 * GRAIN + 4096);
  const back = Buffer.alloc(GRAIN);
  await s.read(back, 3 * GRAIN);
  tt.equal(back[512], 2);
  tt.equal(back[4096 + 1023], 3);
  tt.equal(back[0], 0);
  await s.close();
  const img = await openDisk('misuse-stream.vmdk');
  const all = Buffer.alloc(8 * MiB);
  await img.read(all, 0);
  await img.close();
  const want = Buffer.alloc(8 * MiB);
  want.fill(1, 2 * GRAIN, 3 * GRAIN);
  want.fill(2, 3 * GRAIN + 512, 3 * GRAIN + 1024);
  want.fill(3, 3 * GRAIN + 4096, 3 * GRAIN + 5120);
  tt.ok(all.equals(want), 'the stream holds exactly what was written');
  const err = await vmdkDriver.openWritable!(await LocalFile.open(join(work, 'misuse-stream.vmdk'), 'r+'), opener).catch((e: unknown) => e);
  tt.type(err, UsageError, 'a stream cannot grow in place');
  tt.match((err as Error).message, /keep a monolithicSparse, vmfs or other working copy and export it to streamOptimized/);
  await tt.rejects(createDisk('bad.vmdk', 1000, 'monolithicSparse'), UsageError, 'a size that is not whole sectors');
  await tt.rejects(createDisk('bad2.vmdk', MiB, 'twoGbMaxExtentFlat'), UsageError, 'a subformat we do not write');
  await tt.rejects(createDisk('bad3.vmdk', 4 * TiB, 'monolithicSparse'), UsageError, 'a sparse disk over 2 TiB');
});

t.test('bad input gives typed one-line errors', async (tt) => {
  const size = 16 * MiB;
  const raw = join(work, 'bad.raw');
  const disk = await makeScatteredRaw(raw, size, { seed: 61, count: 20 });
  const w = await createDisk('good.vmdk', size, 'monolithicSparse');
  await copyRaw(raw, mergeRanges(disk.extents), w);
  await w.close();
  const good = await readFile(join(work, 'good.vmdk'));

  const openBytes = async (bytes: Uint8Array) => {
    const img = await vmdkDriver.open(new MemoryFile('mem.vmdk', bytes), opener);
    const buf = Buffer.alloc(size);
    await img.read(buf, 0);
    await img.close();
  };
  const expectError = async (label: string, bytes: Uint8Array, type: new (...a: never[]) => Error, pattern: RegExp) => {
    const err = await openBytes(bytes).then(
      () => null,
      (e: unknown) => e,
    );
    tt.type(err, type, label);
    tt.notMatch((err as Error | null)?.message ?? '', /\n/, `${label}: one line`);
    tt.match((err as Error | null)?.message ?? '', pattern, `${label}: ${(err as Error | null)?.message}`);
  };

  await expectError('truncated inside the grains', good.subarray(0, good.length - 100 * 1024), CorruptImageError, /pass(es)? the end of the file/);
  await expectError('truncated inside the tables', good.subarray(0, 40 * 512), CorruptImageError, /does not fit in the file|truncated/);
  await expectError('only part of a header', good.subarray(0, 300), CorruptImageError, /less than the 512-byte VMDK header/);
  const flipMagic = Buffer.from(good);
  flipMagic[1]! ^= 0x04;
  await expectError('bit-flipped magic', flipMagic, ForeignFormatError, /not a VMDK/);
  const flipCapacity = Buffer.from(good);
  flipCapacity[12 + 6]! ^= 0x10;
  await expectError('bit-flipped capacity', flipCapacity, CorruptImageError, /capacity|grain directory/);
  const flipVersion = Buffer.from(good);
  flipVersion[4]! ^= 0x08;
  await expectError('bit-flipped version', flipVersion, UnsupportedVersionError, /version 9/);
  const textMode = Buffer.from(good);
  textMode[75] = 0x0a;
  await expectError('line endings altered by a text-mode copy', textMode, CorruptImageError, /text mode/);
  const flipGd = Buffer.from(good);
  const gdSector = flipGd.readUInt32LE(56);
  flipGd.writeUInt32LE(0x7fffff00, gdSector * 512);
  await expectError('a grain directory entry pointing past the end', flipGd, CorruptImageError, /grain table 0 .* passes the end of the file/);
  await expectError('foreign bytes', prng(62)(64 * KiB), ForeignFormatError, /not a VMDK/);
  const qcow = Buffer.alloc(64 * KiB);
  qcow.write('QFI\xfb', 0, 'latin1');
  await expectError('a qcow2 header', qcow, ForeignFormatError, /not a VMDK/);

  // a stream cut short loses its footer
  const sw = await createDisk('cut-stream.vmdk', size, 'streamOptimized');
  await copyRaw(raw, mergeRanges(disk.extents), sw);
  await sw.close();
  const stream = await readFile(join(work, 'cut-stream.vmdk'));
  await expectError('a stream cut short', stream.subarray(0, stream.length - 4096), CorruptImageError, /cut short/);

  // a flat file shorter than its descriptor says (qemu-img check does not notice)
  const fw = await createDisk('short.vmdk', size, 'vmfs');
  await copyRaw(raw, mergeRanges(disk.extents), fw);
  await fw.close();
  await truncate(join(work, 'short-flat.vmdk'), size - 512);
  const short = await openDisk('short.vmdk').catch((e: unknown) => e);
  tt.type(short, CorruptImageError, 'short flat file refused');
  tt.match((short as Error).message, /is 16776704 bytes but the descriptor needs 16777216/);
  const report = await checkDisk('short.vmdk');
  tt.match(report.problems.join('\n'), /shorter than the 16777216 the descriptor needs/, 'our check reports it');
  tt.equal((await qemuCheck(join(work, 'short.vmdk'), 'vmdk')).code, 0, 'where qemu-img check sees nothing wrong');

  // a descriptor whose extent file is missing
  await writeFile(join(work, 'orphan.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="vmfs"\nRW 2048 VMFS "nowhere-flat.vmdk"\n');
  const orphan = await openDisk('orphan.vmdk').catch((e: unknown) => e);
  tt.type(orphan, CorruptImageError);
  tt.match((orphan as Error).message, /cannot open the extent "nowhere-flat.vmdk"/);

  // a delta disk is refused rather than read without its parent
  await writeFile(join(work, 'delta.vmdk'), '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType="vmfsSparse"\nparentFileNameHint="base.vmdk"\nRW 2048 VMFSSPARSE "delta-delta.vmdk"\n');
  tt.type(await openDisk('delta.vmdk').catch((e: unknown) => e), UnsupportedVersionError, 'a delta disk');

  // our check finds a grain table that disagrees with its redundant copy
  const mismatch = Buffer.from(good);
  const h = parseSparseHeader(mismatch);
  const gt0 = mismatch.readUInt32LE(h.gdOffset * 512);
  mismatch.writeUInt32LE(mismatch.readUInt32LE(gt0 * 512) + 128, gt0 * 512);
  await writeFile(join(work, 'mismatch.vmdk'), mismatch);
  const mm = await checkDisk('mismatch.vmdk');
  tt.match(mm.problems.join('\n'), /grain 0: the grain table says sector \d+ but the redundant grain table says \d+/, 'GTE != RGTE found');

  // a renamed monolithic file: qemu reads it, libvmdk does not, our check says why
  await copyFile(join(work, 'good.vmdk'), join(work, 'renamed.vmdk'));
  tt.match((await checkDisk('renamed.vmdk')).problems.join('\n'), /names the extent "good.vmdk", not this file's name "renamed.vmdk"/);
});

t.test('mutated headers never escape as anything but our typed errors', async (tt) => {
  const w = await createDisk('fuzz.vmdk', 4 * MiB, 'monolithicSparse');
  await w.write(prng(71)(GRAIN), GRAIN);
  await w.close();
  const good = await readFile(join(work, 'fuzz.vmdk'));
  const s = await createDisk('fuzz-stream.vmdk', 4 * MiB, 'streamOptimized');
  await s.write(prng(72)(GRAIN), GRAIN);
  await s.close();
  const goodStream = await readFile(join(work, 'fuzz-stream.vmdk'));
  const rand = prng(73);
  let typed = 0;
  let opened = 0;
  const t0 = performance.now();
  for (let i = 0; i < 600; i++) {
    const base = i % 2 === 0 ? good : goodStream;
    const bytes = Buffer.from(base);
    const r = rand(8);
    // flip a byte of the header, the footer, or the tables
    const region = i % 3 === 0 ? r.readUInt16LE(0) % 80 : i % 3 === 1 ? bytes.length - 1536 + (r.readUInt16LE(0) % 1536) : 512 * (21 + (r.readUInt16LE(0) % 300));
    bytes[Math.min(region, bytes.length - 1)] ^= 1 << (r[2]! % 8);
    try {
      const img = await vmdkDriver.open(new MemoryFile('fuzz.vmdk', bytes), opener);
      const buf = Buffer.alloc(4 * MiB);
      await img.read(buf, 0);
      await img.allocated();
      await img.close();
      opened++;
    } catch (e) {
      if (e instanceof ImagekeepError) typed++;
      else {
        tt.fail(`mutation ${i} escaped as ${(e as Error).constructor.name}: ${(e as Error).message}`);
        break;
      }
    }
  }
  tt.equal(typed + opened, 600, `${typed} refused with typed errors, ${opened} still readable, in ${(performance.now() - t0).toFixed(0)} ms`);
});

t.test('probe and the descriptor codec', async (tt) => {
  const head = (s: string) => new Uint8Array(Buffer.from(s));
  tt.equal(vmdkDriver.probe(head('KDMV\x01\x00\x00\x00'), new Uint8Array()), 100);
  tt.equal(vmdkDriver.probe(head('# Disk DescriptorFile\nversion=1\n'), new Uint8Array()), 100);
  tt.equal(vmdkDriver.probe(head('# Disk Descriptor File\nversion=1\n'), new Uint8Array()), 100);
  tt.equal(vmdkDriver.probe(head('QFI\xfb'), new Uint8Array()), 0);
  tt.equal(vmdkDriver.probe(head('conectix'), new Uint8Array()), 0);
  const d = parseDescriptor(
    '# Disk DescriptorFile\r\n  version=1\r\nCID=23e4584\r\nparentCID=ffffffff\r\ncreateType="twoGbMaxExtentFlat"\r\nRW 4192256 FLAT "a-f001.vmdk" 0\r\nRDONLY 100 ZERO\r\nRW 8 FLAT "/dev/sdb" 2048\r\nddb.adapterType = "ide"\r\n',
  );
  tt.same(
    d.extents.map((e) => [e.access, e.sectors, e.type, e.fileName, e.startSector]),
    [
      ['RW', 4192256, 'FLAT', 'a-f001.vmdk', 0],
      ['RDONLY', 100, 'ZERO', undefined, 0],
      ['RW', 8, 'FLAT', '/dev/sdb', 2048],
    ],
  );
  tt.equal(d.cid, '23e4584');
  tt.same(d.ddb, [['adapterType', 'ide']]);
});
